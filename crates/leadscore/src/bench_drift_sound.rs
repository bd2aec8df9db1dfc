//! `leadscore bench drift-sound`: how often the drift rules alarm without drift, and how
//! often they find a drift that is there, by window size; and the live hourly case.
//!
//! Everything runs in memory through the library the aggregator uses: the bundled model's
//! reference profile, windows of generated leads scored by the bundled model
//! (`Window::observe`), `Window::report`, `score_psi` and `alerts::evaluate` with the
//! default thresholds. In the size tables a window is a sample of leads from the whole
//! generated period, judged on every feature but the calendar ones, and on the score; in
//! the live case leads are grouped by the hour they were created, and
//! each window judges what the aggregator lets it judge (`Profile::judges`: calendar
//! features only in the roll-up holding their cycle). Prints Markdown for BENCHMARKS.md.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use leadscore_crm::{DriftSpec, Generator, GeneratorConfig, Lead};
use leadscore_drift::alerts::{Severity, Thresholds, evaluate};
use leadscore_drift::{Profile, Window};
use leadscore_model::Model;

#[derive(Debug, Args)]
pub(crate) struct DriftSoundArgs {
    /// Multiplies the number of windows of every size (1 is about 20 million leads).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

const HOUR_MS: i64 = 3_600_000;

/// Sets a drift on the generator's spec.
type Knob = fn(&mut DriftSpec) -> leadscore_crm::Result<()>;

struct Bench {
    model: Model,
    profile: Arc<Profile>,
    thresholds: Thresholds,
}

impl Bench {
    /// Adds `leads` to `window`, scored by the bundled model.
    fn observe(&self, window: &mut Window, leads: &[Lead]) -> anyhow::Result<()> {
        for (lead, score) in leads.iter().zip(self.model.score_batch(leads)?) {
            let Ok(score) = score else { continue };
            let features: BTreeMap<_, _> =
                self.model.features().raw_values(lead).into_iter().collect();
            window.observe(&features, score.probability);
        }
        Ok(())
    }

    /// A window of the next `n` leads of `g`.
    fn window(&self, g: &mut Generator, n: usize) -> anyhow::Result<Window> {
        let mut w = Window::new(self.profile.clone());
        let mut left = n;
        while left > 0 {
            let chunk: Vec<Lead> = (0..left.min(10_000)).map(|_| g.next_lead().lead).collect();
            left -= chunk.len();
            self.observe(&mut w, &chunk)?;
        }
        Ok(w)
    }

    /// Findings of a window of leads from the whole period: every feature but the calendar
    /// ones (a sample of the period is no whole number of weeks; they are judged in the
    /// live table's daily and weekly windows) and the score.
    fn findings(&self, w: &Window) -> Vec<leadscore_drift::alerts::Finding> {
        let score = w.score_psi().map(|psi| (psi, w.score_sample()));
        let report: Vec<_> = w
            .report()
            .into_iter()
            .filter(|d| {
                self.profile
                    .features
                    .iter()
                    .any(|f| f.name == d.feature && f.cycle_ms.is_none())
            })
            .collect();
        evaluate(&report, score, &self.thresholds)
    }
}

fn generator(seed: u64, drift: DriftSpec) -> Generator {
    Generator::new(GeneratorConfig {
        seed,
        drift,
        ..GeneratorConfig::default()
    })
}

fn windows_of(count: usize, scale: f64) -> usize {
    ((count as f64 * scale).round() as usize).max(3)
}

/// Counts findings by kind, feature and severity.
fn tally(kinds: &mut BTreeMap<String, usize>, findings: &[leadscore_drift::alerts::Finding]) {
    for x in findings {
        *kinds
            .entry(format!(
                "{} {} {:?}",
                x.kind,
                x.feature.as_deref().unwrap_or("score"),
                x.severity
            ))
            .or_default() += 1;
    }
}

fn listed(kinds: &BTreeMap<String, usize>) -> String {
    if kinds.is_empty() {
        return "none".into();
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn pct(k: usize, n: usize) -> String {
    format!("{:.2}%", 100.0 * k as f64 / n.max(1) as f64)
}

pub(crate) fn run(args: DriftSoundArgs) -> anyhow::Result<ExitCode> {
    leadscore_model::init_runtime(None)?;
    let model = Model::load_dir(&leadscore_model::bundled_dir())?;
    let profile = Arc::new(Profile::from_metadata(&serde_json::json!({
        "reference": model.metadata().reference,
        "feature_spec": model.metadata().feature_spec,
    }))?);
    let bench = Bench {
        model,
        profile,
        thresholds: Thresholds::default(),
    };
    let features = bench
        .profile
        .features
        .iter()
        .filter(|f| f.cycle_ms.is_none())
        .count();

    println!("### No drift: windows with a finding, by window size\n");
    println!("| window n | windows | warning or worse | any info | info per feature | findings |");
    println!("|---|---|---|---|---|---|");
    let sizes = [
        (100, 2000),
        (1_000, 1000),
        (10_000, 300),
        (100_000, 60),
        (1_000_000, 10),
    ];
    let mut g = generator(7, DriftSpec::default());
    for (n, count) in sizes {
        let count = windows_of(count, args.scale);
        let (mut warned, mut informed, mut infos) = (0, 0, 0);
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..count {
            let f = bench.findings(&bench.window(&mut g, n)?);
            tally(&mut kinds, &f);
            warned += usize::from(f.iter().any(|x| x.severity >= Severity::Warning));
            informed += usize::from(f.iter().any(|x| x.severity == Severity::Info));
            infos += f
                .iter()
                .filter(|x| x.severity == Severity::Info && x.feature.is_some())
                .count();
        }
        println!(
            "| {n} | {count} | {} | {} | {} | {} |",
            pct(warned, count),
            pct(informed, count),
            pct(infos, count * features),
            listed(&kinds)
        );
    }

    println!("\n### Known drift: windows with a warning or worse on the drifted feature\n");
    println!(
        "| drift | feature | window n | windows | warning or worse | info only | mean PSI | mean missing rate |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let drifts: [(&str, &str, Knob); 4] = [
        (
            "industry mix Retail x4, Technology x0.25",
            "industry",
            |d| d.add_mix("industry=Retail:4,Technology:0.25"),
        ),
        ("page_views x2", "page_views", |d| {
            d.add_scale("page_views=2")
        }),
        ("time_on_site missing 3% -> 12%", "time_on_site", |d| {
            d.add_missing("time_on_site=0.12")
        }),
        (
            "industry mix Retail x2 (PSI just under effect_psi)",
            "industry",
            |d| d.add_mix("industry=Retail:2"),
        ),
    ];
    for (what, feature, knob) in drifts {
        let mut spec = DriftSpec::default();
        knob(&mut spec)?;
        let mut g = generator(11, spec);
        for (n, count) in [(1_000, 200), (10_000, 100), (100_000, 20), (1_000_000, 5)] {
            let count = windows_of(count, args.scale);
            let (mut found, mut informed, mut psi, mut missing) = (0, 0, 0.0, 0.0);
            for _ in 0..count {
                let w = bench.window(&mut g, n)?;
                let f = bench.findings(&w);
                let on = |s: Severity| {
                    f.iter()
                        .filter(|x| x.feature.as_deref() == Some(feature))
                        .map(|x| x.severity)
                        .max()
                        == Some(s)
                };
                found += usize::from(on(Severity::Warning) || on(Severity::Critical));
                informed += usize::from(on(Severity::Info));
                if let Some(d) = w.report().into_iter().find(|d| d.feature == feature) {
                    psi += d.psi;
                    missing += d.missing_rate;
                }
            }
            println!(
                "| {what} | {feature} | {n} | {count} | {} | {} | {:.3} | {:.3} |",
                pct(found, count),
                pct(informed, count),
                psi / count as f64,
                missing / count as f64
            );
        }
    }

    // The live case: leads as they are created over a week, hourly windows, daily and
    // weekly roll-ups, each judging what the aggregator lets it judge.
    let leads_n = ((300_000.0 * args.scale.min(1.0)) as usize).max(40_000);
    let config = GeneratorConfig {
        seed: 21,
        days: 14,
        ..GeneratorConfig::default()
    };
    let period = (
        config.end.timestamp_millis() - i64::from(config.days) * 24 * HOUR_MS,
        config.end.timestamp_millis(),
    );
    let mut g = Generator::new(config);
    let leads: Vec<Lead> = (0..leads_n).map(|_| g.next_lead().lead).collect();
    let sizes = [HOUR_MS, 24 * HOUR_MS, 7 * 24 * HOUR_MS];
    println!("\n### Live: {leads_n} leads over 14 days, complete windows by creation time\n");
    println!("| window | windows | judged (n >= 500) | warning or worse | any info | findings |");
    println!("|---|---|---|---|---|---|");
    for size in sizes {
        let mut by_window: BTreeMap<i64, Vec<Lead>> = BTreeMap::new();
        for l in &leads {
            let start = leadscore_drift::window_start(l.created_at.timestamp_millis(), size);
            by_window.entry(start).or_default().push(l.clone());
        }
        let (mut judged, mut warned, mut informed) = (0, 0, 0);
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        // Only windows the period holds whole, as a running aggregator's are.
        by_window.retain(|start, _| *start >= period.0 && start + size <= period.1);
        for group in by_window.values() {
            let mut w = Window::new(bench.profile.clone());
            for chunk in group.chunks(10_000) {
                bench.observe(&mut w, chunk)?;
            }
            let report: Vec<_> = w
                .report()
                .into_iter()
                .filter(|d| bench.profile.judges(Some(&d.feature), size, &sizes))
                .collect();
            let score = w
                .score_psi()
                .map(|psi| (psi, w.score_sample()))
                .filter(|_| bench.profile.judges(None, size, &sizes));
            judged += usize::from(w.scored() >= bench.thresholds.min_sample);
            let f = evaluate(&report, score, &bench.thresholds);
            warned += usize::from(f.iter().any(|x| x.severity >= Severity::Warning));
            informed += usize::from(f.iter().any(|x| x.severity == Severity::Info));
            tally(&mut kinds, &f);
        }
        let name = match size {
            HOUR_MS => "hourly",
            s if s == 24 * HOUR_MS => "daily",
            _ => "weekly",
        };
        println!(
            "| {name} | {} | {judged} | {warned} | {informed} | {} |",
            by_window.len(),
            listed(&kinds)
        );
    }
    Ok(ExitCode::SUCCESS)
}
