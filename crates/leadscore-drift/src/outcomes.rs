//! Outcomes of a window's scored leads: conversion rate, revenue per lead by band, and AUC.

use std::collections::HashMap;

use crate::report::OutcomeSummary;

/// One labelled lead: its score, its band and whether it converted.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// Score the lead was given.
    pub score: f64,
    /// Band of that score.
    pub band: String,
    /// Converted (else lost).
    pub converted: bool,
    /// The won deal's value, when converted and entered in the CRM.
    pub deal_value: Option<f64>,
}

/// Area under the ROC curve: the probability that a converted lead scored
/// above a lost one (ties count half), by ranks. `None` without both classes.
pub fn auc(rows: &[Labelled]) -> Option<f64> {
    let positives = rows.iter().filter(|r| r.converted).count();
    let negatives = rows.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut sorted: Vec<&Labelled> = rows.iter().collect();
    sorted.sort_by(|a, b| a.score.total_cmp(&b.score));
    // Sum of the positives' ranks, ties given their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1].score == sorted[i].score {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += average * sorted[i..=j].iter().filter(|r| r.converted).count() as f64;
        i = j + 1;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Labelled count, conversion rate and revenue (total and per labelled lead) per band
/// present, and AUC. A won lead without a deal value adds no revenue.
pub fn summarize(rows: &[Labelled]) -> OutcomeSummary {
    let mut by_band: HashMap<String, (u64, u64, f64)> = HashMap::new();
    for r in rows {
        let e = by_band.entry(r.band.clone()).or_default();
        e.0 += 1;
        e.1 += u64::from(r.converted);
        if r.converted {
            e.2 += r
                .deal_value
                .filter(|v| v.is_finite() && *v > 0.0)
                .unwrap_or(0.0);
        }
    }
    OutcomeSummary {
        labelled: rows.len() as u64,
        conversion_rate_by_band: by_band
            .iter()
            .map(|(band, (n, c, _))| (band.clone(), *c as f64 / *n as f64))
            .collect(),
        revenue_by_band: by_band
            .iter()
            .map(|(band, (_, _, revenue))| (band.clone(), *revenue))
            .collect(),
        revenue_per_lead_by_band: by_band
            .iter()
            .map(|(band, (n, _, revenue))| (band.clone(), revenue / *n as f64))
            .collect(),
        auc: auc(rows),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn row(score: f64, converted: bool) -> Labelled {
        Labelled {
            score,
            band: if score >= 0.5 { "High" } else { "Low" }.into(),
            converted,
            deal_value: converted.then_some(1_000.0),
        }
    }

    #[test]
    fn revenue_per_lead_counts_every_labelled_lead_of_the_band() {
        let mut rows = vec![
            Labelled {
                deal_value: Some(30_000.0),
                ..row(0.9, true)
            },
            Labelled {
                deal_value: None, // won, value not entered yet
                ..row(0.8, true)
            },
            row(0.7, false),
            row(0.6, false),
            Labelled {
                deal_value: Some(5_000.0),
                ..row(0.2, true)
            },
            row(0.1, false),
        ];
        // A lost lead's stray value never counts.
        rows[2].deal_value = Some(99.0);
        let s = summarize(&rows);
        assert_eq!(s.revenue_by_band["High"], 30_000.0);
        assert_eq!(s.revenue_per_lead_by_band["High"], 7_500.0);
        assert_eq!(s.revenue_by_band["Low"], 5_000.0);
        assert_eq!(s.revenue_per_lead_by_band["Low"], 2_500.0);
        assert_eq!(s.conversion_rate_by_band["High"], 0.5);
    }

    #[test]
    fn perfect_random_and_inverted_rankings() {
        let perfect = [
            row(0.9, true),
            row(0.8, true),
            row(0.2, false),
            row(0.1, false),
        ];
        assert_eq!(auc(&perfect), Some(1.0));
        let inverted = [row(0.1, true), row(0.9, false)];
        assert_eq!(auc(&inverted), Some(0.0));
        let tied = [row(0.5, true), row(0.5, false)];
        assert_eq!(auc(&tied), Some(0.5));
        assert_eq!(auc(&[row(0.3, true)]), None);
        let s = summarize(&perfect);
        assert_eq!(s.labelled, 4);
        assert_eq!(s.conversion_rate_by_band["High"], 1.0);
        assert_eq!(s.conversion_rate_by_band["Low"], 0.0);
    }

    proptest! {
        #[test]
        fn auc_equals_the_share_of_correctly_ordered_pairs(
            rows in proptest::collection::vec((0u8..20, any::<bool>()), 2..60)
        ) {
            let rows: Vec<Labelled> = rows.into_iter().map(|(s, c)| row(f64::from(s) / 20.0, c)).collect();
            let mut pairs = 0.0;
            let mut wins = 0.0;
            for p in rows.iter().filter(|r| r.converted) {
                for n in rows.iter().filter(|r| !r.converted) {
                    pairs += 1.0;
                    wins += if p.score > n.score { 1.0 } else if p.score == n.score { 0.5 } else { 0.0 };
                }
            }
            match auc(&rows) {
                Some(a) => prop_assert!((a - wins / pairs).abs() < 1e-12),
                None => prop_assert_eq!(pairs, 0.0),
            }
        }
    }
}
