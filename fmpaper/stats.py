"""Statistics of the comparisons: chance NDCG of a sampled mode, paired tests over users
(bootstrap interval, Wilcoxon signed-rank), means over seeds.

Chance: a target at a uniformly random rank among n candidates has expected NDCG@k =
(1/n) sum_{r=1..min(k,n)} 1 / log2(r + 1), which for n = 101 is 0.0450 at k = 10 and 0.0697 at
k = 20.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from . import FmpaperError
from .evaluate import MODES, PROTOCOLS
from .rows import combined, trained
from .runs import dataset_name, finished, metrics_of, user_ndcg


CANDIDATES = 101         # the target and 100 sampled negatives


def _gains(n: int, k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, min(k, n) + 2))      # gain at ranks 1..min(k, n)


def chance_ndcg(n: int = CANDIDATES, k: int = 10) -> float:
    """Expected NDCG@k of a target at a uniformly random rank among n candidates."""
    return float(_gains(n, k).sum() / n)


def chance_sd(n: int = CANDIDATES, k: int = 10) -> float:
    """Per-user standard deviation of that NDCG@k."""
    g = _gains(n, k)
    return math.sqrt(float((g ** 2).sum() / n) - chance_ndcg(n, k) ** 2)


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value (zero differences dropped); 1.0 if all are zero."""
    diff = np.asarray(diff, dtype=float)
    if not np.any(diff != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)


def bootstrap_ci(diffs: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile bootstrap CI of the mean of each column of `diffs` (users x comparisons), all
    columns resampled with the same user draws (paired). Returns (comparisons, 2)."""
    diffs = np.asarray(diffs, dtype=float)
    if diffs.ndim == 1:
        diffs = diffs[:, None]
    n = len(diffs)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, diffs.shape[1]))
    chunk = max(1, 2_000_000 // max(n, 1))
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - s), n))
        means[s:s + len(idx)] = diffs[idx].mean(1)
    a = (1 - level) / 2
    return np.quantile(means, [a, 1 - a], axis=0).T


def mean_over_seeds(df: pd.DataFrame, protocol: str, mode: str, metric: str) -> pd.DataFrame:
    """Per row of a `collect` frame (or a runs.csv read back): mean, sd and count over seeds of one value."""
    sub = df[(df["protocol"] == protocol) & (df["mode"] == mode) & (df["metric"] == metric)]
    return sub.groupby("row")["value"].agg(["mean", "std", "count"])


def paired_tests(dataset: str | None, profile: str, seeds: list[int], names=None, k: int = 10,
                 n_boot: int = 2000, level: float = 0.95) -> pd.DataFrame:
    """Per-user NDCG@k of each combined row (merges, ensemble) against (a) the best single model
    (the trained row with the highest validation NDCG@10, chosen per seed) and (b) the uniform
    merge, under every protocol and mode. A user's difference is averaged over seeds; the table
    gives its mean, a paired bootstrap CI (users resampled) and the Wilcoxon signed-rank p-value."""
    found, _ = finished(dataset, profile, seeds)
    compared = combined() if names is None else list(names)
    singles = trained(paper_only=True)                                   # the paper's five
    keys = [f"{pr}.{m}" for pr in PROTOCOLS for m in MODES]
    best = {}
    for s in seeds:
        cands = [(metrics_of(found[(n, s)]).get("valid_ndcg@10", -1), n) for n in singles if (n, s) in found]
        if cands:
            best[s] = max(cands)[1]
    refs = {"best single model": lambda s: best.get(s), "uniform merge": lambda s: "uniform"}
    cache = {}

    def per_user(run, key):
        if (run, key) not in cache:
            cache[(run, key)] = user_ndcg(run, key, k)
        return cache[(run, key)]
    comparisons, diffs = [], []
    for name in compared:
        for ref_name, ref_of in refs.items():
            if name == "uniform" and ref_name == "uniform merge":
                continue
            pairs = [(found.get((name, s)), found.get((ref_of(s), s)), ref_of(s)) for s in seeds]
            pairs = [(a, b, r) for a, b, r in pairs if a is not None and b is not None]
            if not pairs:
                continue
            for key in keys:
                d = np.mean([per_user(a, key) - per_user(b, key) for a, b, _ in pairs], 0)
                protocol, mode = key.split(".")
                comparisons.append(dict(row=name, reference=ref_name,
                                        reference_rows=", ".join(sorted({r for _, _, r in pairs})),
                                        protocol=protocol, mode=mode, seeds=len(pairs), users=len(d),
                                        mean_diff=float(d.mean()), wins=int((d > 0).sum()),
                                        losses=int((d < 0).sum()), ties=int((d == 0).sum()),
                                        p_wilcoxon=wilcoxon_p(d)))
                diffs.append(d)
    cols = ["row", "reference", "reference_rows", "protocol", "mode", "seeds", "users", "mean_diff",
            "ci_low", "ci_high", "wins", "losses", "ties", "p_wilcoxon"]
    if not comparisons:
        out = pd.DataFrame(columns=cols)
    else:
        n_users = {len(d) for d in diffs}
        if len(n_users) != 1:
            raise FmpaperError("runs disagree on the number of test users; were they made from the same data?")
        ci = bootstrap_ci(np.stack(diffs, 1), n_boot, level)
        out = pd.DataFrame(comparisons)
        out["ci_low"], out["ci_high"] = ci[:, 0], ci[:, 1]
        out = out[cols]
    out.attrs.update(dataset=dataset_name(dataset, profile), profile=profile, seeds=seeds, k=k, n_boot=n_boot, level=level)
    return out
