//! Debezium envelope decoding: the direct decoder vs the generic Avro decoder followed by
//! the envelope conversion, on the same bytes.
//!
//! `cargo bench -p leadscore-cdc --bench decode`. Figures go to BENCHMARKS.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, deprecated)] // a bench binary

use apache_avro::types::Value;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use leadscore_cdc::direct::Plan;
use std::hint::black_box;

fn opt(v: Option<Value>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(x) => Value::Union(1, Box::new(x)),
    }
}

fn record(i: usize) -> Value {
    let s = |x: &str| Value::String(x.to_string());
    let row = Value::Record(vec![
        ("lead_id".into(), s(&format!("lead_{i:09}"))),
        ("company_size".into(), opt(Some(s("Medium")))),
        ("industry".into(), opt(Some(s("Technology")))),
        ("page_views".into(), opt(Some(Value::Int(15)))),
        ("time_on_site".into(), opt(Some(Value::Double(300.5)))),
        (
            "form_completion_time".into(),
            opt(Some(Value::Double(45.2))),
        ),
        ("referral_source".into(), opt(Some(s("Google")))),
        ("country".into(), opt(Some(s("UAE")))),
        ("created_at".into(), s("2024-03-01T10:00:00.123456Z")),
        ("updated_at".into(), s("2024-03-01T10:00:00.123456Z")),
        ("status".into(), s("new")),
        ("converted_at".into(), opt(None)),
        ("deal_value".into(), opt(None)),
    ]);
    let null = || Value::Union(0, Box::new(Value::Null));
    Value::Record(vec![
        ("before".into(), null()),
        ("after".into(), opt(Some(row))),
        (
            "source".into(),
            Value::Record(vec![
                ("version".into(), s("3.6.1.Final")),
                ("connector".into(), s("postgresql")),
                ("name".into(), s("crm")),
                ("ts_ms".into(), Value::Long(1_700_000_000_000)),
                ("snapshot".into(), Value::Union(0, Box::new(s("false")))),
                ("db".into(), s("crm")),
                ("sequence".into(), opt(Some(s("[\"1\",\"2\"]")))),
                (
                    "ts_us".into(),
                    opt(Some(Value::Long(1_700_000_000_000_000))),
                ),
                ("ts_ns".into(), null()),
                ("schema".into(), s("public")),
                ("table".into(), s("leads")),
                ("txId".into(), opt(Some(Value::Long(771)))),
                ("lsn".into(), opt(Some(Value::Long(23_456_789)))),
                ("xmin".into(), null()),
            ]),
        ),
        ("transaction".into(), null()),
        ("op".into(), s("c")),
        ("ts_ms".into(), opt(Some(Value::Long(1_700_000_000_001)))),
        ("ts_us".into(), null()),
        ("ts_ns".into(), null()),
    ])
}

fn bench(c: &mut Criterion) {
    let schema = leadscore_schemas::find("crm.public.leads.Envelope.avsc")
        .unwrap()
        .parse()
        .unwrap();
    let plan = Plan::compile(&schema).unwrap();
    let data: Vec<Vec<u8>> = (0..1024)
        .map(|i| apache_avro::to_avro_datum(&schema, record(i)).unwrap())
        .collect();
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("direct", |b| {
        b.iter(|| {
            i = (i + 1) % data.len();
            black_box(plan.decode(&data[i]).unwrap())
        })
    });
    g.bench_function("generic", |b| {
        b.iter(|| {
            i = (i + 1) % data.len();
            let v = apache_avro::from_avro_datum(&schema, &mut &data[i][..], None).unwrap();
            black_box(leadscore_cdc::from_avro(&v).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
