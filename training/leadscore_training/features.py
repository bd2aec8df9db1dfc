"""Feature building, shared in meaning with the Rust `leadscore-features` crate.

The encoding is the contract between training and serving, written into
every model's metadata (``feature_spec``) and proven equal on shared test
vectors (``models/default/parity.json``):

* categorical columns: index of the value in the sorted vocabulary seen in
  training, as float32; missing and never-seen values are NaN;
* numeric columns: the value as float32; missing is NaN;
* ``hour_of_day`` (0-23) and ``day_of_week`` (0 = Monday) of ``created_at`` in UTC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

CATEGORICAL = ["company_size", "industry", "referral_source", "country"]
NUMERIC = ["page_views", "time_on_site", "form_completion_time"]
DERIVED = ["hour_of_day", "day_of_week"]
FEATURES = CATEGORICAL + NUMERIC + DERIVED

SPEC_VERSION = 1


@dataclass
class FeatureSpec:
    """Names, kinds and vocabularies of the model's input columns, in order."""

    vocabularies: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def fit(cls, df: pd.DataFrame) -> "FeatureSpec":
        vocab = {}
        for col in CATEGORICAL:
            vocab[col] = sorted(str(v) for v in df[col].dropna().unique())
        return cls(vocab)

    @classmethod
    def from_json(cls, spec: dict) -> "FeatureSpec":
        if spec.get("version") != SPEC_VERSION:
            raise ValueError(f"feature spec version {spec.get('version')} is not {SPEC_VERSION}")
        names = [f["name"] for f in spec["features"]]
        if names != FEATURES:
            raise ValueError(f"feature spec names {names} differ from {FEATURES}")
        return cls({f["name"]: f["vocabulary"] for f in spec["features"] if f["kind"] == "categorical"})

    def to_json(self) -> dict:
        features = []
        for name in FEATURES:
            if name in CATEGORICAL:
                features.append({"name": name, "kind": "categorical", "source": name,
                                 "vocabulary": self.vocabularies[name]})
            elif name in NUMERIC:
                features.append({"name": name, "kind": "numeric", "source": name})
            else:
                features.append({"name": name, "kind": "numeric", "source": "created_at",
                                 "derive": name})
        return {
            "version": SPEC_VERSION,
            "features": features,
            "encoding": {
                "categorical": "index in vocabulary as float32",
                "missing": "NaN",
                "unseen_category": "NaN",
                "hour_of_day": "UTC hour of created_at, 0-23",
                "day_of_week": "UTC weekday of created_at, 0 = Monday",
            },
        }

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Rows of ``df`` (CRM columns) to a float32 matrix in FEATURES order."""
        out = np.full((len(df), len(FEATURES)), np.nan, dtype=np.float32)
        for j, col in enumerate(CATEGORICAL):
            index = {v: float(i) for i, v in enumerate(self.vocabularies[col])}
            out[:, j] = df[col].map(lambda v: index.get(v, math.nan) if isinstance(v, str) else math.nan).to_numpy(dtype=np.float32)
        for k, col in enumerate(NUMERIC):
            out[:, len(CATEGORICAL) + k] = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float32)
        created = pd.to_datetime(df["created_at"], utc=True)
        out[:, len(CATEGORICAL) + len(NUMERIC)] = created.dt.hour.to_numpy(dtype=np.float32)
        out[:, len(CATEGORICAL) + len(NUMERIC) + 1] = created.dt.day_of_week.to_numpy(dtype=np.float32)
        return out


def quantile_edges(values: np.ndarray, bins: int = 10) -> list[float]:
    """Interior cut points of ``bins`` quantile bins (duplicates removed)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return []
    qs = np.quantile(values.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return sorted(set(float(q) for q in qs))


def bin_proportions(values: np.ndarray, edges: list[float]) -> list[float]:
    """Share of non-missing values per bin; bin i holds values with exactly i edges <= value."""
    values = values[~np.isnan(values)]
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"),
                         minlength=len(edges) + 1)
    total = counts.sum()
    return [float(c / total) if total else 0.0 for c in counts]


def reference(df: pd.DataFrame, X: np.ndarray, scores: np.ndarray, spec: FeatureSpec) -> dict:
    """Reference distributions of every feature and of the score, for drift."""
    numeric = {}
    for j, name in enumerate(FEATURES):
        if name in CATEGORICAL:
            continue
        col = X[:, j]
        edges = quantile_edges(col)
        numeric[name] = {
            "edges": edges,
            "proportions": bin_proportions(col, edges),
            "missing_rate": float(np.isnan(col).mean()),
            "count": int((~np.isnan(col)).sum()),
        }
    categorical = {}
    for name in CATEGORICAL:
        col = df[name]
        present = col.dropna().astype(str)
        counts = present.value_counts()
        categorical[name] = {
            "proportions": {v: float(counts.get(v, 0) / max(len(present), 1)) for v in spec.vocabularies[name]},
            "missing_rate": float(col.isna().mean()),
            "count": int(len(present)),
        }
    score_edges = quantile_edges(scores.astype(np.float32))
    return {
        "bin_rule": "bin i holds values with exactly i edges <= value (searchsorted right)",
        "numeric": numeric,
        "categorical": categorical,
        "score": {"edges": score_edges, "proportions": bin_proportions(scores, score_edges),
                  "count": int(len(scores))},
    }
