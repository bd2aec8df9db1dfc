//! leadscore-stats against scipy and a reference PSI on shared fixtures
//! (`tests/fixtures/scipy.json`, written by `tests/make_fixtures.py`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leadscore_stats::{
    Histogram, chi_square, chi_square_2samp, js_distance, kl, ks_2samp, psi, two_proportion,
};
use serde_json::Value;

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/scipy.json")).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn close(name: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
        "{name}: {got} vs scipy {want}"
    );
}

#[test]
fn ks_statistic_and_asymptotic_p_match_scipy() {
    for case in fixtures()["ks"].as_array().unwrap() {
        let (d, p) = ks_2samp(&floats(&case["a"]), &floats(&case["b"])).unwrap();
        close("ks D", d, case["d"].as_f64().unwrap());
        close("ks p", p, case["p_asymp"].as_f64().unwrap());
    }
}

#[test]
fn psi_kl_js_and_chi_square_match_the_references() {
    for case in fixtures()["histograms"].as_array().unwrap() {
        let reference = Histogram {
            counts: counts(&case["reference"]),
        }
        .smoothed();
        let observed = counts(&case["actual"]);
        let actual = Histogram {
            counts: observed.clone(),
        }
        .smoothed();
        close(
            "psi",
            psi(&reference, &actual),
            case["psi"].as_f64().unwrap(),
        );
        close("kl", kl(&actual, &reference), case["kl"].as_f64().unwrap());
        close(
            "js",
            js_distance(&reference, &actual),
            case["js"].as_f64().unwrap(),
        );
        let (stat, p) = chi_square(&observed, &reference).unwrap();
        close("chi2", stat, case["chi2"].as_f64().unwrap());
        close("chi2 p", p, case["chi2_p"].as_f64().unwrap());
    }
}

#[test]
fn two_sample_chi_square_matches_scipy_contingency() {
    for case in fixtures()["two_sample"].as_array().unwrap() {
        let (stat, p) =
            chi_square_2samp(&floats(&case["reference"]), &counts(&case["actual"])).unwrap();
        close("chi2 2samp", stat, case["chi2"].as_f64().unwrap());
        close("chi2 2samp p", p, case["p"].as_f64().unwrap());
    }
}

#[test]
fn two_proportion_z_matches_scipy_norm() {
    for case in fixtures()["proportions"].as_array().unwrap() {
        let f = |k: &str| case[k].as_f64().unwrap();
        let (z, p) = two_proportion(f("x1"), f("n1"), f("x2"), f("n2")).unwrap();
        close("z", z, f("z"));
        close("p", p, f("p"));
    }
}
