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

two_sample_cases = []
for bins, big_n, n, concentration, unseen in [(5, 45000, 1000, 1.0, 0), (10, 44000, 100000, 0.5, 3), (8, 45404, 500, 2.0, 1), (4, 40000, 1000000, 1.0, 50)]:
    probs = rng.dirichlet(np.full(bins, concentration))
    ref = probs * big_n  # a reference's proportions times its size: fractional counts
    ref = np.append(ref, 0.0)  # the unseen bin: never in the reference
    act = np.append(rng.multinomial(n, probs), unseen)
    keep = (ref + act) > 0
    chi2, p, _, _ = stats.chi2_contingency(np.vstack([ref[keep], act[keep]]), correction=False)
    two_sample_cases.append({"reference": ref.tolist(), "actual": act.tolist(), "chi2": float(chi2), "p": float(p)})

proportion_cases = []
for x1, n1, x2, n2 in [(1330, 44076, 3900, 31000), (1330, 44076, 35, 1000), (300, 10000, 1200, 10000), (50, 1000, 40, 1000)]:
    pooled = (x1 + x2) / (n1 + n2)
    z = (x2 / n2 - x1 / n1) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    proportion_cases.append({"x1": x1, "n1": n1, "x2": x2, "n2": n2, "z": float(z), "p": float(2 * stats.norm.sf(abs(z)))})

out = Path(__file__).parent / "fixtures" / "scipy.json"
out.write_text(json.dumps({"ks": ks_cases, "histograms": hist_cases, "two_sample": two_sample_cases, "proportions": proportion_cases}, indent=1) + "\n")
print(f"wrote {out}")
