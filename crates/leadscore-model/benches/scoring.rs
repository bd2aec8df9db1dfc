//! Scoring latency and throughput of the bundled model, features included.
//!
//! `cargo bench -p leadscore-model --bench scoring` (needs ORT_DYLIB_PATH;
//! `eval "$(deploy/local/stack env)"`). Figures go to BENCHMARKS.md.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)] // a bench binary, not a library

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use leadscore_crm::{Generator, GeneratorConfig, Lead};
use leadscore_model::{Model, bundled_dir};
use std::hint::black_box;

fn leads(n: usize) -> Vec<Lead> {
    Generator::new(GeneratorConfig {
        seed: 11,
        ..Default::default()
    })
    .take(n)
    .map(|g| g.lead)
    .collect()
}

fn bench(c: &mut Criterion) {
    let model = Model::load_dir(&bundled_dir()).expect("bundled model loads");
    let pool = leads(4096);

    // Latency percentiles of single-lead scoring (criterion reports means).
    let mut samples: Vec<u128> = Vec::with_capacity(20_000);
    for round in 0..22_000usize {
        let lead = &pool[round % pool.len()];
        let start = std::time::Instant::now();
        black_box(model.score(lead).unwrap().unwrap());
        if round >= 2_000 {
            samples.push(start.elapsed().as_nanos());
        }
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)] as f64 / 1000.0
    };
    println!(
        "single_lead/features_and_score percentiles over {} calls: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
        samples.len(),
        pct(0.50),
        pct(0.99),
        pct(0.999)
    );

    let mut g = c.benchmark_group("single_lead");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("features_only", |b| {
        b.iter(|| {
            i = (i + 1) % pool.len();
            black_box(model.features().build(&pool[i]).unwrap())
        })
    });
    g.bench_function("features_and_score", |b| {
        b.iter(|| {
            i = (i + 1) % pool.len();
            black_box(model.score(&pool[i]).unwrap().unwrap())
        })
    });
    // Per-feature contributions (TreeSHAP over every tree), features included.
    g.bench_function("features_and_contributions", |b| {
        b.iter(|| {
            i = (i + 1) % pool.len();
            black_box(model.contributions(&pool[i]).unwrap())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("batch");
    for size in [256usize, 1024] {
        g.throughput(Throughput::Elements(size as u64));
        g.bench_function(format!("features_and_score_{size}"), |b| {
            let mut start = 0usize;
            b.iter_batched(
                || {
                    start = (start + size) % (pool.len() - size);
                    &pool[start..start + size]
                },
                |batch| black_box(model.score_batch(batch).unwrap()),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("features_score_and_3_reasons_{size}"), |b| {
            let mut start = 0usize;
            b.iter_batched(
                || {
                    start = (start + size) % (pool.len() - size);
                    &pool[start..start + size]
                },
                |batch| black_box(model.score_batch_with_reasons(batch, 3).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // The engines side by side on the same built features: native trees vs ONNX Runtime.
    let width = model.features().width();
    let mut rows = Vec::with_capacity(pool.len() * width);
    for l in &pool {
        model.features().build_into(l, &mut rows).unwrap();
    }
    println!("engine in use: {}", model.engine().as_str());
    let mut g = c.benchmark_group("engine");
    for size in [1usize, 256, 1024] {
        g.throughput(Throughput::Elements(size as u64));
        let (mut start, total) = (0usize, pool.len());
        let mut next = move || {
            start = (start + size) % (total - size);
            start
        };
        g.bench_function(format!("native_{size}"), |b| {
            b.iter(|| {
                let s = next();
                black_box(
                    model
                        .score_features(&rows[s * width..(s + size) * width], size)
                        .unwrap(),
                )
            })
        });
        g.bench_function(format!("onnxruntime_{size}"), |b| {
            b.iter(|| {
                let s = next();
                black_box(
                    model
                        .score_onnx(&rows[s * width..(s + size) * width], size)
                        .unwrap(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
