import math

import numpy as np
import pandas as pd

from leadscore_training.features import FEATURES, FeatureSpec, bin_proportions, quantile_edges, reference


def frame(rows):
    df = pd.DataFrame(rows)
    for c in ["company_size", "industry", "referral_source", "country"]:
        if c not in df:
            df[c] = None
    for c in ["page_views", "time_on_site", "form_completion_time"]:
        if c not in df:
            df[c] = math.nan
    return df


def test_vocabulary_is_sorted_and_unseen_or_missing_is_nan():
    train = frame([
        {"company_size": "Small", "industry": "Retail", "referral_source": "Google", "country": "AE",
         "page_views": 3, "time_on_site": 10.0, "form_completion_time": 5.0, "created_at": "2026-01-05T10:00:00Z"},
        {"company_size": "Large", "industry": "Finance", "referral_source": "Direct", "country": "US",
         "page_views": 9, "time_on_site": 99.5, "form_completion_time": 50.0, "created_at": "2026-01-06T10:00:00Z"},
    ])
    spec = FeatureSpec.fit(train)
    assert spec.vocabularies["company_size"] == ["Large", "Small"]
    X = spec.transform(frame([
        {"company_size": "Small", "industry": "Mining", "referral_source": None, "country": "US",
         "page_views": None, "time_on_site": 1.5, "form_completion_time": 2.0, "created_at": "2026-01-04T23:30:00Z"},
    ]))
    row = dict(zip(FEATURES, X[0], strict=True))
    assert row["company_size"] == 1.0
    assert math.isnan(row["industry"]) and math.isnan(row["referral_source"]) and math.isnan(row["page_views"])
    assert row["time_on_site"] == np.float32(1.5)
    assert row["hour_of_day"] == 23.0 and row["day_of_week"] == 6.0  # a Sunday


def test_time_features_are_utc():
    spec = FeatureSpec({c: [] for c in ["company_size", "industry", "referral_source", "country"]})
    X = spec.transform(frame([{"created_at": "2026-03-08T02:30:00+04:00"}]))
    row = dict(zip(FEATURES, X[0], strict=True))
    assert row["hour_of_day"] == 22.0 and row["day_of_week"] == 5.0  # Saturday 22:30 UTC


def test_spec_round_trips_through_json():
    spec = FeatureSpec({"company_size": ["A", "B"], "industry": ["X"], "referral_source": [], "country": ["AE"]})
    assert FeatureSpec.from_json(spec.to_json()) == spec


def test_bins_follow_the_documented_rule():
    edges = quantile_edges(np.arange(100, dtype=np.float32), bins=4)
    assert len(edges) == 3
    props = bin_proportions(np.array([edges[0], edges[0] - 1, edges[2] + 1, np.nan]), edges)
    # a value equal to an edge goes to the bin above it; NaN is not counted
    assert props == [1 / 3, 1 / 3, 0.0, 1 / 3]


def test_reference_proportions_sum_to_one(leads_csv):
    from leadscore_training import data

    df, _ = data.labelled(data.load(str(leads_csv)))
    spec = FeatureSpec.fit(df)
    X = spec.transform(df)
    ref = reference(df, X, np.linspace(0, 1, len(df)), spec)
    for name, r in ref["numeric"].items():
        assert abs(sum(r["proportions"]) - 1) < 1e-9, name
    for name, r in ref["categorical"].items():
        assert abs(sum(r["proportions"].values()) - 1) < 1e-9, name
    assert abs(sum(ref["score"]["proportions"]) - 1) < 1e-9
