"""Shared test vectors: raw leads, their features and probabilities, computed in Python.

    python -m leadscore_training.parity --model models/default --data leads.csv

Writes ``<model>/parity.json``. The Rust test in ``crates/leadscore-model``
builds features and scores for the same raw leads and must agree within 1e-5.
The leads include missing values, never-seen categories and edge values.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import data
from .features import FEATURES, FeatureSpec
from .train import onnx_scores

RAW = ["lead_id", "company_size", "industry", "page_views", "time_on_site",
       "form_completion_time", "referral_source", "country", "created_at"]


def edge_cases() -> list[dict]:
    base = {"lead_id": "edge", "company_size": "Medium", "industry": "Technology", "page_views": 15,
            "time_on_site": 300.5, "form_completion_time": 45.2, "referral_source": "Google",
            "country": "AE", "created_at": "2024-01-01T00:00:00Z"}
    cases = [
        {},
        {"company_size": None, "industry": None, "page_views": None, "time_on_site": None,
         "form_completion_time": None, "referral_source": None, "country": None},
        {"industry": "Aerospace", "referral_source": "TikTok", "country": "ZZ", "company_size": "Huge"},
        {"page_views": 0, "time_on_site": 0.0, "form_completion_time": 0.0},
        {"page_views": 999_999, "time_on_site": 2_500_000.0, "form_completion_time": 86_000.0},
        {"time_on_site": 0.1, "form_completion_time": 7.9, "created_at": "2026-03-01T23:59:59Z"},
        {"created_at": "2026-03-08T12:30:00+04:00"},
        {"time_on_site": 123.456789012, "form_completion_time": 1e-7},
    ]
    return [{**base, **c, "lead_id": f"edge_{i}"} for i, c in enumerate(cases)]


def clean(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%dT%H:%M:%SZ")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leadscore_training.parity", description=__doc__)
    p.add_argument("--model", required=True, help="directory with model.onnx and metadata.json")
    p.add_argument("--data", required=True, help="CSV of leads to sample from")
    p.add_argument("--rows", type=int, default=200)
    args = p.parse_args(argv)

    model = Path(args.model)
    meta = json.loads((model / "metadata.json").read_text())
    spec = FeatureSpec.from_json(meta["feature_spec"])
    sample = data.load(args.data).sample(n=args.rows, random_state=7)
    leads = [{c: clean(r[c]) for c in RAW} for _, r in sample.iterrows()] + edge_cases()
    df = pd.DataFrame(leads)
    for c in ["page_views", "time_on_site", "form_completion_time"]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    X = spec.transform(df)
    probs = onnx_scores((model / "model.onnx").read_bytes(), X)
    out = {
        "model_version": meta["version"],
        "feature_names": FEATURES,
        "leads": leads,
        "features": [[None if math.isnan(v) else float(v) for v in row] for row in X],
        "probabilities": [float(v) for v in probs],
    }
    booster_file = model / "lightgbm.txt"
    if booster_file.exists():
        # LightGBM's exact TreeSHAP: one contribution per feature, then the expected value,
        # in raw margin (log-odds) units.
        import lightgbm as lgb

        contrib = lgb.Booster(model_file=str(booster_file)).predict(
            np.asarray(X, dtype=np.float64), pred_contrib=True)
        out["contributions"] = [[float(v) for v in row[:-1]] for row in contrib]
        out["expected_value"] = float(contrib[0][-1])
    (model / "parity.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(leads)} shared test vectors to {model / 'parity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
