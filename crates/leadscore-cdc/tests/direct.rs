//! The direct decoder against the generic one: for every record the generic path accepts,
//! the direct decoder gives the same event; for every record it refuses, the direct
//! decoder declines (and the caller decodes generically).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test
#![allow(deprecated)] // the one-datum helpers are the generic path this is compared with

use apache_avro::Schema;
use apache_avro::types::Value;
use leadscore_cdc::direct::Plan;
use leadscore_cdc::from_avro;
use proptest::prelude::*;

fn envelope_schema() -> Schema {
    leadscore_schemas::find("crm.public.leads.Envelope.avsc")
        .unwrap()
        .parse()
        .unwrap()
}

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(x) => Value::Union(1, Box::new(f(x))),
    }
}

#[derive(Debug, Clone)]
struct RowSpec {
    lead_id: String,
    company_size: Option<String>,
    industry: Option<String>,
    page_views: Option<i32>,
    time_on_site: Option<f64>,
    form_completion_time: Option<f64>,
    referral_source: Option<String>,
    country: Option<String>,
    created_at: String,
    status: String,
    converted_at: Option<String>,
    deal_value: Option<f64>,
}

fn row_value(r: &RowSpec) -> Value {
    Value::Record(vec![
        ("lead_id".into(), Value::String(r.lead_id.clone())),
        (
            "company_size".into(),
            opt(r.company_size.clone(), Value::String),
        ),
        ("industry".into(), opt(r.industry.clone(), Value::String)),
        ("page_views".into(), opt(r.page_views, Value::Int)),
        ("time_on_site".into(), opt(r.time_on_site, Value::Double)),
        (
            "form_completion_time".into(),
            opt(r.form_completion_time, Value::Double),
        ),
        (
            "referral_source".into(),
            opt(r.referral_source.clone(), Value::String),
        ),
        ("country".into(), opt(r.country.clone(), Value::String)),
        ("created_at".into(), Value::String(r.created_at.clone())),
        ("updated_at".into(), Value::String(r.created_at.clone())),
        ("status".into(), Value::String(r.status.clone())),
        (
            "converted_at".into(),
            opt(r.converted_at.clone(), Value::String),
        ),
        ("deal_value".into(), opt(r.deal_value, Value::Double)),
    ])
}

fn envelope(
    op: &str,
    before: Option<&RowSpec>,
    after: Option<&RowSpec>,
    source_ts: i64,
    ts_ms: Option<i64>,
) -> Value {
    let null = || Value::Union(0, Box::new(Value::Null));
    let source = Value::Record(vec![
        ("version".into(), Value::String("3.6.1.Final".into())),
        ("connector".into(), Value::String("postgresql".into())),
        ("name".into(), Value::String("crm".into())),
        ("ts_ms".into(), Value::Long(source_ts)),
        (
            "snapshot".into(),
            Value::Union(0, Box::new(Value::String("false".into()))),
        ),
        ("db".into(), Value::String("crm".into())),
        ("sequence".into(), null()),
        ("ts_us".into(), Value::Union(1, Box::new(Value::Long(7)))),
        ("ts_ns".into(), null()),
        ("schema".into(), Value::String("public".into())),
        ("table".into(), Value::String("leads".into())),
        ("txId".into(), Value::Union(1, Box::new(Value::Long(42)))),
        ("lsn".into(), Value::Union(1, Box::new(Value::Long(1234)))),
        ("xmin".into(), null()),
    ]);
    Value::Record(vec![
        ("before".into(), opt(before, row_value)),
        ("after".into(), opt(after, row_value)),
        ("source".into(), source),
        ("transaction".into(), null()),
        ("op".into(), Value::String(op.into())),
        ("ts_ms".into(), opt(ts_ms, Value::Long)),
        ("ts_us".into(), null()),
        ("ts_ns".into(), null()),
    ])
}

/// Encodes with the generic writer, then compares both decoders on the bytes.
fn check(schema: &Schema, plan: &Plan, bytes: &[u8]) -> Result<(), TestCaseError> {
    let generic = apache_avro::from_avro_datum(schema, &mut &bytes[..], None)
        .ok()
        .and_then(|v| from_avro(&v).ok());
    let direct = plan.decode(bytes);
    match generic {
        // Compared as text: a NaN the row conversion lets through equals itself there.
        Some(event) => prop_assert_eq!(format!("{direct:?}"), format!("{:?}", Some(event))),
        None => prop_assert!(
            direct.is_none(),
            "direct accepted what generic refuses: {direct:?}"
        ),
    }
    Ok(())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z ]{1,12}",
        Just("Technology".to_string()),
        Just("Enterprise".to_string()),
        "\\PC{0,20}",
    ]
}

fn row() -> impl Strategy<Value = RowSpec> {
    (
        prop_oneof![Just(String::new()), "lead_[0-9]{1,6}"],
        proptest::option::of(prop_oneof![
            Just("Small".to_string()),
            Just("Medium".to_string()),
            Just("Large".to_string()),
            Just("Enterprise".to_string()),
            text()
        ]),
        proptest::option::of(text()),
        proptest::option::of(prop_oneof![Just(-1), 0..500i32, Just(i32::MAX)]),
        proptest::option::of(prop_oneof![
            Just(f64::NAN),
            Just(-5.0),
            0.0..5000.0f64,
            Just(f64::INFINITY)
        ]),
        proptest::option::of(0.0..600.0f64),
        proptest::option::of(text()),
        proptest::option::of(text()),
        prop_oneof![
            Just("2024-03-01T10:00:00Z".to_string()),
            Just("2024-03-01T10:00:00.123456Z".to_string()),
            Just("yesterday".to_string()),
        ],
        prop_oneof![
            Just("new".to_string()),
            Just("converted".to_string()),
            Just("lost".to_string()),
            Just("weird".to_string()),
        ],
        proptest::option::of(Just("2024-04-01T00:00:00Z".to_string())),
        proptest::option::of(0.0f64..1e7),
    )
        .prop_map(
            |(
                lead_id,
                company_size,
                industry,
                page_views,
                time_on_site,
                form_completion_time,
                referral_source,
                country,
                created_at,
                status,
                converted_at,
                deal_value,
            )| RowSpec {
                lead_id,
                company_size,
                industry,
                page_views,
                time_on_site,
                form_completion_time,
                referral_source,
                country,
                created_at,
                status,
                converted_at,
                deal_value,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn direct_equals_generic_on_debezium_envelopes(
        op in prop_oneof![Just("c"), Just("r"), Just("u"), Just("d"), Just("t"), Just("x")],
        before in proptest::option::of(row()),
        after in proptest::option::of(row()),
        source_ts in 0i64..2_000_000_000_000,
        ts_ms in proptest::option::of(0i64..2_000_000_000_000),
        cut in 0usize..4,
        extra in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let schema = envelope_schema();
        let plan = Plan::compile(&schema).unwrap();
        let value = envelope(op, before.as_ref(), after.as_ref(), source_ts, ts_ms);
        let mut bytes = apache_avro::to_avro_datum(&schema, value).unwrap();
        check(&schema, &plan, &bytes)?;
        // Cut short, or with bytes left over: never accepted directly.
        if cut > 0 && bytes.len() > cut {
            prop_assert!(plan.decode(&bytes[..bytes.len() - cut]).is_none());
        }
        if !extra.is_empty() {
            bytes.extend(&extra);
            prop_assert!(plan.decode(&bytes).is_none());
        }
    }
}

/// A writer schema evolved as BACKWARD compatibility allows (a new optional column first,
/// columns reordered, a new envelope field): fields are found by name either way.
#[test]
fn an_evolved_writer_schema_decodes_like_the_generic_path() {
    let text = leadscore_schemas::find("crm.public.leads.Envelope.avsc")
        .unwrap()
        .text;
    let mut doc: serde_json::Value = serde_json::from_str(text).unwrap();
    let value_fields = doc["fields"][0]["type"][1]["fields"]
        .as_array_mut()
        .unwrap();
    value_fields.insert(
        0,
        serde_json::json!({"name": "tier", "type": ["null", "long", {"type": "array", "items": "string"}], "default": null}),
    );
    value_fields.swap(2, 5);
    doc["fields"].as_array_mut().unwrap().insert(
        2,
        serde_json::json!({"name": "note", "type": {"type": "map", "values": "double"}}),
    );
    let schema = Schema::parse_str(&doc.to_string()).unwrap();
    let plan = Plan::compile(&schema).unwrap();
    let row = |id: &str| {
        let Value::Record(mut fields) = row_value(&RowSpec {
            lead_id: id.into(),
            company_size: Some("Large".into()),
            industry: None,
            page_views: Some(12),
            time_on_site: Some(300.5),
            form_completion_time: Some(45.0),
            referral_source: Some("Google".into()),
            country: Some("UAE".into()),
            created_at: "2024-03-01T10:00:00Z".into(),
            status: "new".into(),
            converted_at: None,
            deal_value: None,
        }) else {
            unreachable!()
        };
        fields.insert(
            0,
            (
                "tier".into(),
                Value::Union(
                    2,
                    Box::new(Value::Array(vec![Value::String("gold".into())])),
                ),
            ),
        );
        fields.swap(2, 5);
        Value::Record(fields)
    };
    let Value::Record(mut env) = envelope("u", None, None, 1_700_000_000_000, Some(5)) else {
        unreachable!()
    };
    env[0].1 = Value::Union(1, Box::new(row("lead_1")));
    env[1].1 = Value::Union(1, Box::new(row("lead_1")));
    env.insert(
        2,
        (
            "note".into(),
            Value::Map(
                [("a".to_string(), Value::Double(1.5))]
                    .into_iter()
                    .collect(),
            ),
        ),
    );
    let bytes = apache_avro::to_avro_datum(&schema, Value::Record(env)).unwrap();
    let generic =
        from_avro(&apache_avro::from_avro_datum(&schema, &mut &bytes[..], None).unwrap()).unwrap();
    assert_eq!(plan.decode(&bytes), Some(generic));
}

#[test]
fn a_writer_schema_that_is_not_a_record_is_not_compiled() {
    let e = Plan::compile(&Schema::String).unwrap_err();
    assert!(e.0.contains("not a record"), "{e}");
}
