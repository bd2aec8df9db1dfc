#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;

fn bundled_profile() -> Arc<Profile> {
    let text = include_str!("../../../models/default/metadata.json");
    let metadata: serde_json::Value = serde_json::from_str(text).unwrap();
    Arc::new(Profile::from_metadata(&metadata).unwrap())
}

/// Draws a lead's features from the reference itself (bin centres), or shifted.
fn lead(
    profile: &Profile,
    i: u64,
    shift_page_views: bool,
    new_category: bool,
) -> BTreeMap<String, RawValue> {
    let mut out = BTreeMap::new();
    for f in &profile.features {
        // A deterministic pseudo-random draw from the expected distribution.
        let u = ((i.wrapping_mul(2_654_435_761) ^ (f.name.len() as u64 * 97)) % 10_000) as f64
            / 10_000.0;
        let mut acc = 0.0;
        let mut bin = f.expected.len() - 1;
        for (k, p) in f.expected.iter().enumerate() {
            acc += p;
            if u < acc {
                bin = k;
                break;
            }
        }
        let value = match &f.bins {
            FeatureBins::Numeric(b) => {
                let missing = b.missing();
                if bin == missing {
                    RawValue::Null
                } else {
                    let inner = bin.clamp(1, b.cuts.len() + 1) - 1;
                    let lo = if inner == 0 {
                        b.cuts[0] - 1.0
                    } else {
                        b.cuts[inner - 1]
                    };
                    let hi = if inner == b.cuts.len() {
                        lo + 2.0
                    } else {
                        b.cuts[inner]
                    };
                    let mut v = (lo + hi) / 2.0;
                    if shift_page_views && f.name == "page_views" {
                        v += 25.0;
                    }
                    RawValue::Double(v)
                }
            }
            FeatureBins::Categorical(b) => {
                if new_category && f.name == "referral_source" && i.is_multiple_of(4) {
                    RawValue::String("TikTok".into())
                } else if bin < b.vocabulary.len() {
                    RawValue::String(b.vocabulary[bin].clone())
                } else {
                    RawValue::Null
                }
            }
        };
        out.insert(f.name.clone(), value);
    }
    out
}

fn window_of(profile: &Arc<Profile>, n: u64, shift: bool, new_category: bool) -> Window {
    let mut w = Window::new(profile.clone());
    for i in 0..n {
        w.observe(&lead(profile, i, shift, new_category), 0.2);
    }
    w
}

#[test]
fn the_bundled_metadata_gives_every_feature_a_profile() {
    let p = bundled_profile();
    let names: Vec<&str> = p.features.iter().map(|f| f.name.as_str()).collect();
    for want in [
        "company_size",
        "country",
        "day_of_week",
        "page_views",
        "referral_source",
        "time_on_site",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    for f in &p.features {
        let sum: f64 = f.expected.iter().sum();
        assert!((sum - 1.0).abs() < 1e-9, "{}: {sum}", f.name);
    }
    assert!(p.score.is_some());
}

#[test]
fn a_window_drawn_from_the_reference_shows_no_drift_and_shifts_are_flagged_on_their_feature() {
    let p = bundled_profile();
    let calm = window_of(&p, 5000, false, false);
    for d in calm.report() {
        assert!(d.psi < 0.1, "{}: psi {} without drift", d.feature, d.psi);
        assert!(d.psi.is_finite() && d.kl.is_finite() && d.js.is_finite());
    }
    // Each feature's distributions come with the report, bin by bin, and add up to one.
    for d in calm.report() {
        let profile = p.features.iter().find(|f| f.name == d.feature).unwrap();
        assert_eq!(d.bins.len(), profile.reference.len(), "{}", d.feature);
        let (r, c): (f64, f64) = d
            .bins
            .iter()
            .fold((0.0, 0.0), |a, b| (a.0 + b.reference, a.1 + b.current));
        assert!(
            (r - 1.0).abs() < 1e-6 && (c - 1.0).abs() < 1e-6,
            "{}: {r} {c}",
            d.feature
        );
        assert_eq!(d.bins.last().unwrap().label, "(missing)");
    }
    let shifted = window_of(&p, 5000, true, false);
    let report = shifted.report();
    let pv = report.iter().find(|d| d.feature == "page_views").unwrap();
    assert!(pv.psi > 0.5, "page_views psi {}", pv.psi);
    // The shift shows in the bins: the window's mass has moved off the reference's.
    let moved: f64 = pv
        .bins
        .iter()
        .map(|b| (b.current - b.reference).abs())
        .sum();
    assert!(moved > 0.5, "{:?}", pv.bins);
    assert!(pv.ks.unwrap().1 < 1e-6, "KS p-value {:?}", pv.ks);
    for d in report.iter().filter(|d| d.feature != "page_views") {
        assert!(d.psi < 0.1, "{} should not move: {}", d.feature, d.psi);
    }
    let new_cat = window_of(&p, 5000, false, true).report();
    let rs = new_cat
        .iter()
        .find(|d| d.feature == "referral_source")
        .unwrap();
    assert!(
        (rs.new_category_rate.unwrap() - 0.25).abs() < 0.01,
        "{:?}",
        rs.new_category_rate
    );
    assert!(rs.psi > 0.25 && rs.chi2.unwrap().1 < 1e-6);
}

proptest! {
    #[test]
    fn partitions_merge_to_the_same_window_as_one_instance(
        n in 0u64..400,
        split in 0u64..400,
        shift in any::<bool>(),
    ) {
        let p = bundled_profile();
        let split = split.min(n);
        let whole = {
            let mut w = Window::new(p.clone());
            for i in 0..n { w.observe(&lead(&p, i, shift, false), (i % 100) as f64 / 100.0); }
            w
        };
        let mut left = Window::new(p.clone());
        let mut right = Window::new(p.clone());
        for i in 0..split { left.observe(&lead(&p, i, shift, false), (i % 100) as f64 / 100.0); }
        for i in split..n { right.observe(&lead(&p, i, shift, false), (i % 100) as f64 / 100.0); }
        left.merge(&right).unwrap();
        prop_assert_eq!(&left, &whole);
        prop_assert_eq!(left.report(), whole.report());
    }
}

#[test]
fn calendar_features_carry_their_cycle_from_the_feature_spec() {
    let profile = bundled_profile();
    let cycle = |name: &str| {
        profile
            .features
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.cycle_ms)
    };
    assert_eq!(cycle("hour_of_day"), Some(Some(86_400_000)));
    assert_eq!(cycle("day_of_week"), Some(Some(604_800_000)));
    assert_eq!(cycle("page_views"), Some(None));
    assert_eq!(cycle("industry"), Some(None));
}

/// Counts of `n` draws from `p` (xorshift, inverse CDF).
fn multinomial(p: &[f64], n: u64, seed: u64) -> Vec<u64> {
    let mut x = seed.max(1);
    let mut out = vec![0u64; p.len()];
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 11) as f64 / (1u64 << 53) as f64;
        let mut acc = 0.0;
        let mut bin = p.len() - 1;
        for (k, q) in p.iter().enumerate() {
            acc += q;
            if u < acc {
                bin = k;
                break;
            }
        }
        out[bin] += 1;
    }
    out
}

#[test]
fn a_large_window_drawn_from_the_reference_is_not_significant() {
    // One-sample chi-square against the reference's proportions (floored unseen bin,
    // reference taken as exact) had a median p of 3e-86 at n = 1,000,000.
    let profile = bundled_profile();
    for f in profile
        .features
        .iter()
        .filter(|f| matches!(f.bins, FeatureBins::Categorical(_)))
    {
        for seed in [1, 2] {
            let counts = multinomial(&f.reference, 1_000_000, seed * 7919);
            let reference: Vec<f64> = f.reference.iter().map(|p| p * f.count as f64).collect();
            let (_, p) = leadscore_stats::chi_square_2samp(&reference, &counts).unwrap();
            assert!(p > 0.001, "{}: p {p}", f.name);
            assert_eq!(counts[counts.len() - 2], 0, "nothing unseen drawn");
        }
    }
}

#[test]
fn calendar_features_are_judged_in_the_smallest_window_holding_their_cycle() {
    let profile = bundled_profile();
    let (h, d, w) = (3_600_000, 86_400_000, 604_800_000);
    let sizes = [h, d, w];
    let judged = |f: Option<&str>| {
        sizes
            .iter()
            .filter(|s| profile.judges(f, **s, &sizes))
            .copied()
            .collect::<Vec<_>>()
    };
    assert_eq!(judged(Some("page_views")), [h]);
    assert_eq!(
        judged(None),
        [d],
        "the score: the model takes the hour of day"
    );
    assert_eq!(judged(Some("hour_of_day")), [d]);
    assert_eq!(judged(Some("day_of_week")), [w]);
    // Without a weekly roll-up, day of week is never judged; with daily base windows,
    // hour of day is judged in them.
    assert!(!profile.judges(Some("day_of_week"), d, &[h, d]));
    assert!(profile.judges(Some("hour_of_day"), d, &[d, w]));
}
