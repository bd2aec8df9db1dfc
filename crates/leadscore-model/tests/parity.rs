//! Shared test vectors: Rust features and scores equal the Python ones
//! (`models/default/parity.json`, written by `training/leadscore_training/parity.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use chrono::{DateTime, Utc};
use leadscore_crm::{Lead, Status};
use leadscore_model::{Engine, Model, NATIVE_TOLERANCE, bundled_dir};
use proptest::prelude::*;
use serde_json::Value;

/// The shared test vectors of the bundled model.
fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(bundled_dir().join("parity.json")).unwrap())
        .unwrap()
}

fn lead(v: &Value) -> Lead {
    let s = |k: &str| v[k].as_str().map(str::to_string);
    let created_at: DateTime<Utc> = DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    Lead {
        lead_id: s("lead_id").unwrap(),
        company_size: s("company_size"),
        industry: s("industry"),
        page_views: v["page_views"].as_f64().map(|x| x as i32),
        time_on_site: v["time_on_site"].as_f64(),
        form_completion_time: v["form_completion_time"].as_f64(),
        referral_source: s("referral_source"),
        country: s("country"),
        created_at,
        updated_at: created_at,
        status: Status::New,
        converted_at: None,
    }
}

#[test]
fn rust_features_and_scores_equal_python_on_shared_vectors() {
    let dir = bundled_dir();
    let fixture = fixture();
    let model = Model::load_dir(&dir).unwrap();
    assert_eq!(
        model.engine(),
        Engine::Native,
        "the bundled LightGBM export is evaluated natively"
    );
    assert_eq!(fixture["model_version"], model.metadata().version.as_str());
    let names: Vec<&str> = model.features().names().collect();
    let expected_names: Vec<&str> = fixture["feature_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names, expected_names);

    let leads: Vec<Lead> = fixture["leads"]
        .as_array()
        .unwrap()
        .iter()
        .map(lead)
        .collect();
    assert!(
        leads.len() > 200,
        "the fixture holds sampled and edge-case leads"
    );
    let batch = model.score_batch(&leads).unwrap();
    for (i, l) in leads.iter().enumerate() {
        let features = model.features().build(l).unwrap();
        let expected = fixture["features"][i].as_array().unwrap();
        for (j, (got, want)) in features.iter().zip(expected).enumerate() {
            match want.as_f64() {
                None => assert!(
                    got.is_nan(),
                    "lead {} feature {}: want missing, got {got}",
                    l.lead_id,
                    names[j]
                ),
                Some(w) => assert!(
                    (f64::from(*got) - w).abs() <= 1e-5,
                    "lead {} feature {}: rust {got} python {w}",
                    l.lead_id,
                    names[j]
                ),
            }
        }
        let want = fixture["probabilities"][i].as_f64().unwrap();
        let single = model.score(l).unwrap().unwrap().probability;
        assert!(
            (single - want).abs() <= 1e-5,
            "lead {}: rust {single} python {want}",
            l.lead_id
        );
        let onnx = model.score_onnx(&features, 1).unwrap()[0];
        assert!(
            (single - onnx).abs() <= NATIVE_TOLERANCE,
            "lead {}: native {single} ONNX Runtime {onnx}",
            l.lead_id
        );
        let batched = batch[i].as_ref().unwrap().probability;
        assert!(
            (batched - single).abs() <= 1e-6,
            "batch and single agree for {}",
            l.lead_id
        );
    }
}

#[test]
fn contributions_equal_lightgbms_pred_contrib_on_shared_vectors() {
    let dir = bundled_dir();
    let fixture = fixture();
    let model = Model::load_dir(&dir).unwrap();
    assert!(
        model.explained(),
        "the bundled model carries its trees' covers"
    );
    let expected_value = fixture["expected_value"].as_f64().unwrap();
    let leads = fixture["leads"].as_array().unwrap();
    let mut worst = 0.0f64;
    for (i, v) in leads.iter().enumerate() {
        let l = lead(v);
        let (contributions, base) = model.contributions(&l).unwrap();
        assert!(
            (base - expected_value).abs() <= 1e-6,
            "{base} vs LightGBM {expected_value}"
        );
        let want = fixture["contributions"][i].as_array().unwrap();
        assert_eq!(contributions.len(), want.len());
        for ((name, got), w) in contributions.iter().zip(want) {
            let w = w.as_f64().unwrap();
            worst = worst.max((got - w).abs());
            assert!(
                (got - w).abs() <= 1e-6,
                "lead {} {name}: {got} vs LightGBM {w}",
                l.lead_id
            );
        }
        // Local accuracy: they add up to the model's log-odds.
        let p = model.score(&l).unwrap().unwrap().probability;
        let margin = base + contributions.iter().map(|(_, c)| c).sum::<f64>();
        assert!(
            (1.0 / (1.0 + (-margin).exp()) - p).abs() <= 1e-6,
            "lead {}",
            l.lead_id
        );
    }
    eprintln!("largest difference from LightGBM: {worst:e}");
}

#[test]
fn reasons_are_the_largest_contributions_with_the_leads_values() {
    let dir = bundled_dir();
    let fixture = fixture();
    let model = Model::load_dir(&dir).unwrap();
    for (i, v) in fixture["leads"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .take(40)
    {
        let l = lead(v);
        let reasons = model.reasons(&l, 3).unwrap();
        assert_eq!(reasons.len(), 3);
        // The three largest |contributions| of LightGBM's, in that order.
        let mut want: Vec<(String, f64)> = fixture["feature_names"]
            .as_array()
            .unwrap()
            .iter()
            .zip(fixture["contributions"][i].as_array().unwrap())
            .map(|(n, c)| (n.as_str().unwrap().to_string(), c.as_f64().unwrap()))
            .collect();
        want.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        for (r, (name, c)) in reasons.iter().zip(&want) {
            assert_eq!(&r.feature, name, "lead {}", l.lead_id);
            assert!((r.contribution - c).abs() <= 1e-6);
        }
        // In plain words, with the lead's own value.
        let first = &reasons[0];
        let shown = first.to_string();
        assert!(shown.starts_with(&format!("{}=", first.feature)), "{shown}");
        if first.feature == "page_views" {
            assert_eq!(first.value, l.page_views.map(|p| p.to_string()));
        }
    }
    let edge = lead(&fixture["leads"].as_array().unwrap().last().unwrap().clone());
    assert!(model.reasons(&edge, 20).unwrap().len() <= model.features().width());
}

#[test]
fn a_batch_carries_each_leads_reasons_and_they_read_back_from_their_text() {
    let model = Model::load_dir(&bundled_dir()).unwrap();
    let fixture = fixture();
    let leads: Vec<Lead> = fixture["leads"]
        .as_array()
        .unwrap()
        .iter()
        .map(lead)
        .collect();
    let batch = model.score_batch_with_reasons(&leads, 3).unwrap();
    let plain = model.score_batch(&leads).unwrap();
    assert_eq!(batch.len(), leads.len());
    for ((l, got), score) in leads.iter().zip(&batch).zip(&plain) {
        let (Ok((s, reasons)), Ok(want)) = (got, score) else {
            panic!("lead {} refused", l.lead_id);
        };
        assert_eq!(s.probability, want.probability, "lead {}", l.lead_id);
        let reasons = reasons.as_ref().expect("the bundled model is explained");
        assert_eq!(reasons, &model.reasons(l, 3).unwrap(), "lead {}", l.lead_id);
        for r in reasons {
            let back: leadscore_model::Reason = r.to_string().parse().unwrap();
            assert_eq!(back.feature, r.feature);
            assert_eq!(back.value, r.value);
            assert!((back.contribution - r.contribution).abs() <= 0.005);
        }
    }
    // The texts the scorer writes are the structured reasons' own words.
    let texts = model.score_batch_with_reason_texts(&leads, 3).unwrap();
    for (got, want) in texts.iter().zip(&batch) {
        let (Ok((_, Some(got))), Ok((_, Some(want)))) = (got, want) else {
            panic!("a lead without reasons");
        };
        let want: Vec<String> = want.iter().map(ToString::to_string).collect();
        assert_eq!(got.to_vec(), want);
    }
    // No reasons asked, none computed.
    let none = model.score_batch_with_reasons(&leads[..3], 0).unwrap();
    assert!(none.iter().all(|r| matches!(r, Ok((_, None)))));
}

#[test]
fn a_batch_with_an_invalid_lead_scores_the_rest() {
    let model = Model::load_dir(&bundled_dir()).unwrap();
    let fixture = fixture();
    let mut leads: Vec<Lead> = fixture["leads"].as_array().unwrap()[..5]
        .iter()
        .map(lead)
        .collect();
    let expected: Vec<f64> = leads
        .iter()
        .map(|l| model.score(l).unwrap().unwrap().probability)
        .collect();
    leads[2].time_on_site = Some(f64::NAN);
    let out = model.score_batch(&leads).unwrap();
    assert_eq!(out[2].as_ref().unwrap_err().field, "time_on_site");
    for i in [0, 1, 3, 4] {
        assert!((out[i].as_ref().unwrap().probability - expected[i]).abs() < 1e-9);
    }
}

/// A feature value as the builder can make it: missing, small integers (codes, counts,
/// hours) or any finite float.
fn feature() -> impl Strategy<Value = f32> {
    prop_oneof![
        1 => Just(f32::NAN),
        3 => (0u16..60).prop_map(f32::from),
        3 => -1.0e4f32..1.0e4,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn native_scores_equal_onnx_runtime_on_random_rows(
        rows in proptest::collection::vec(proptest::collection::vec(feature(), 9), 1..64)
    ) {
        let model = Model::load_dir(&bundled_dir()).unwrap();
        let width = model.features().width();
        prop_assert_eq!(width, 9);
        let flat: Vec<f32> = rows.concat();
        let n = rows.len();
        let native = model.score_features(&flat, n).unwrap();
        let onnx = model.score_onnx(&flat, n).unwrap();
        for (i, (a, b)) in native.iter().zip(&onnx).enumerate() {
            prop_assert!((a - b).abs() <= NATIVE_TOLERANCE, "row {i}: native {a} ONNX Runtime {b}");
        }
    }
}

#[test]
fn a_model_without_covers_scores_the_same_without_reasons() {
    let dir = bundled_dir();
    let text = std::fs::read_to_string(dir.join("metadata.json")).unwrap();
    let mut meta = leadscore_model::Metadata::parse("bundled", &text).unwrap();
    assert!(meta.explain.is_some(), "the bundled model has covers");
    meta.explain = None;
    let onnx = std::fs::read(dir.join("model.onnx")).unwrap();
    let plain = Model::from_parts(&onnx, meta).unwrap();
    let explained = Model::load_dir(&dir).unwrap();
    assert!(!plain.explained() && explained.explained());
    let leads: Vec<Lead> = fixture()["leads"].as_array().unwrap()[..20]
        .iter()
        .map(lead)
        .collect();
    let with = explained.score_batch_with_reason_texts(&leads, 3).unwrap();
    let without = plain.score_batch_with_reason_texts(&leads, 3).unwrap();
    for (a, b) in with.iter().zip(&without) {
        let (Ok((a, Some(_))), Ok((b, None))) = (a, b) else {
            panic!("{a:?} / {b:?}");
        };
        assert_eq!(a.probability, b.probability);
    }
    assert!(plain.reasons(&leads[0], 3).is_none());
}
