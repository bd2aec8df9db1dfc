"""Regenerates fixtures/scipy.json: the statistics computed by scipy/numpy on shared inputs.

Run with the stack's venv: ~/.cache/leadscore/venv/bin/python make_fixtures.py
The Rust tests (scipy_parity.rs) compare leadscore-stats with these values to 1e-6.
"""
import json
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

EPSILON = 1e-4
rng = np.random.default_rng(2026)


def smooth(counts):
    counts = np.asarray(counts, dtype=float)
    total = counts[counts > 0].sum()
    if total <= 0:
        return np.full(len(counts), 1.0 / len(counts))
    p = np.maximum(np.where(counts > 0, counts / total, 0.0), EPSILON)
    return p / p.sum()


def psi(expected, actual):
    return float(np.sum((actual - expected) * np.log(actual / expected)))


ks_cases = []
for n, m, shift, scale in [(50, 60, 0.0, 1.0), (200, 150, 0.3, 1.0), (1000, 2000, 0.1, 1.2), (3000, 2500, 0.0, 1.0), (500, 40, 1.0, 2.0)]:
    a = rng.normal(0.0, 1.0, n).round(3)
    b = rng.normal(shift, scale, m).round(3)
    d = stats.ks_2samp(a, b).statistic
    en = n * m / (n + m)
    ks_cases.append({"a": a.tolist(), "b": b.tolist(), "d": float(d), "p_asymp": float(stats.kstwobign.sf(np.sqrt(en) * d))})

hist_cases = []
for bins, n, concentration in [(5, 1000, 1.0), (10, 5000, 0.5), (12, 300, 2.0), (4, 50, 1.0), (8, 20000, 0.2)]:
    ref = rng.multinomial(10 * n, rng.dirichlet(np.full(bins, concentration)))
    act = rng.multinomial(n, rng.dirichlet(np.full(bins, concentration)))
    act[0] = 0  # an empty bin: the epsilon floor must keep everything finite
    p, q = smooth(ref), smooth(act)
    chi = stats.chisquare(act, f_exp=p * act.sum())
    hist_cases.append({
        "reference": ref.tolist(),
        "actual": act.tolist(),
        "psi": psi(p, q),
        "kl": float(stats.entropy(q, p)),
        "js": float(jensenshannon(p, q)),
        "chi2": float(chi.statistic),
        "chi2_p": float(chi.pvalue),
    })

out = Path(__file__).parent / "fixtures" / "scipy.json"
out.write_text(json.dumps({"ks": ks_cases, "histograms": hist_cases}, indent=1) + "\n")
print(f"wrote {out}")
