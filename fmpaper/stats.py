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
from .rows import combined, get_row, members_trained_as_long, one_seed_of, trained, uniform_of
from .runs import dataset_name, finished, is_finished, metrics_of, run_dir, user_ndcg


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


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of p-values (family-wise error): the i-th smallest of m
    p-values becomes max_{j <= i} min(1, (m - j + 1) p_(j)), in the input's order."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def hierarchical_ci(diffs: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> np.ndarray:
    """Percentile interval of the mean of diffs (seeds x users x comparisons) when seeds and users
    are both resampled: each resample draws S seeds with replacement and U users with
    replacement (the same users for every seed and comparison, so pairs stay paired), and takes
    the mean over the drawn seeds of each seed's mean over the drawn users. With one seed this
    is the paired user bootstrap. Returns (comparisons, 2)."""
    diffs = np.asarray(diffs, dtype=float)
    n_seeds, n_users, n_comp = diffs.shape
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, n_comp))
    flat = diffs.transpose(0, 2, 1).reshape(n_seeds * n_comp, n_users)   # (S*C, U)
    chunk = 500
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        user_w = rng.multinomial(n_users, np.full(n_users, 1 / n_users), size=b).T / n_users   # (U, b)
        per_seed = (flat @ user_w).reshape(n_seeds, n_comp, b)          # each seed's mean over drawn users
        if n_seeds > 1:
            seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b) / n_seeds   # (b, S)
        else:
            seed_w = np.ones((b, 1))
        means[start:start + b] = np.einsum("bs,scb->bc", seed_w, per_seed)
    a = (1 - level) / 2
    return np.quantile(means, [a, 1 - a], axis=0).T


# what a combined row is compared with (`paired_tests` says how each is chosen), in table order
SELECTED, ORACLE, UNIFORM, ONE_SEED, AS_LONG = REFERENCES = (
    "validation-selected model", "best member on test (oracle)", "uniform merge",
    "same merge, members of one seed", "best member trained as long, on test (oracle)")


# the (protocol, mode) columns compared: `as-run` is left out (its FULL is paper FULL, its
# POPULAR reads shuffled data and sits at chance by construction), and corrected FULL is paper FULL
PAIRED_KEYS = tuple(f"{pr}.{m}" for pr in PROTOCOLS for m in MODES
                    if pr != "as-run" and (pr, m) != ("corrected", "full"))


def paired_tests(dataset: str | None, profile: str, seeds: list[int], names=None, k: int = 10,
                 n_boot: int = 2000, level: float = 0.95, alpha: float = 0.05,
                 family: str = "scratch") -> pd.DataFrame:
    """Per-user NDCG@k of each combined row (merges, ensemble) of one family of rows against
    its references, in every column of PAIRED_KEYS:

    - the validation-selected model: the trained row of the paper with the best validation
      NDCG@10, chosen per seed (what a practitioner would deploy instead of merging);
    - the best member on test (an oracle): per seed and column, the merged member with the best
      test mean in that column;
    - the uniform merge of the same members;
    - for a merge of members trained with different seeds, the same merge of members of one seed
      (which share their initial weights and batch order; `rows.one_seed_of`);
    - for a merge trained further after merging, the best of its members trained further the
      same way (`rows.members_trained_as_long`), chosen like the oracle above: the extra CE
      epochs are then a budget both sides had.

    Per comparison: the mean difference over seeds and users; a percentile interval that
    resamples seeds and users together (`hierarchical_ci`; users only for one seed; column
    `interval` says which); the Wilcoxon signed-rank p of the users' differences averaged over
    seeds, and that p adjusted by Holm over every comparison of the table (`p_holm`). `verdict`
    is "better" or "worse" when the adjusted p is below `alpha` and the interval excludes 0 on
    that side, else "not resolved"."""
    found, _ = finished(dataset, profile, seeds)
    compared = combined(family, profile) if names is None else list(names)
    singles = trained(paper_only=True)                                   # the paper's five
    keys = PAIRED_KEYS
    cache = {}

    def per_user(run, key):
        if (run, key) not in cache:
            cache[(run, key)] = user_ndcg(run, key, k)
        return cache[(run, key)]
    selected = {}
    for s in seeds:
        cands = [(metrics_of(found[(n, s)]).get("valid_ndcg@10", -1), n) for n in singles if (n, s) in found]
        if cands:
            selected[s] = max(cands)[1]

    def reference(ref, name, s, key):
        """(row, run dir) of the reference for row `name`, seed s, column `key` (None: none)."""
        if ref == SELECTED:
            r = selected.get(s)
            return (r, found.get((r, s)))
        if ref in (UNIFORM, ONE_SEED):
            r = uniform_of(name) if ref == UNIFORM else one_seed_of(name)
            return (r, found.get((r, s)))
        members = get_row(name).needs(s)
        if ref == AS_LONG:                     # each member's control, of the member's seed
            members = list(zip(members_trained_as_long(name), (ms for _, ms in members)))
        members = [(m, run_dir(m, dataset, profile, ms)) for m, ms in members]
        if not all(is_finished(d) for _, d in members):      # the best of some members is no oracle
            return (None, None)
        return max(members, key=lambda md: per_user(md[1], key).mean())
    comparisons, diffs = [], []
    for name in compared:
        for ref in REFERENCES:
            if ((ref == UNIFORM and uniform_of(name) is None)      # a uniform merge itself
                    or (ref == ONE_SEED and one_seed_of(name) is None)   # members of one seed
                    or (ref == AS_LONG and members_trained_as_long(name) is None)):   # no budget to match
                continue
            for key in keys:
                chosen = [(found.get((name, s)), *reference(ref, name, s, key)) for s in seeds]
                pairs = [(a, b, r) for a, r, b in chosen if a is not None and b is not None]
                if not pairs:
                    continue
                d = np.stack([per_user(a, key) - per_user(b, key) for a, b, _ in pairs])   # (S, U)
                protocol, mode = key.split(".")
                avg = d.mean(0)
                comparisons.append(dict(row=name, reference=ref,
                                        reference_rows=", ".join(sorted({r for _, _, r in pairs})),
                                        protocol=protocol, mode=mode, seeds=len(pairs), users=d.shape[1],
                                        mean_diff=float(d.mean()), interval="seeds and users" if len(pairs) > 1 else "users",
                                        wins=int((avg > 0).sum()), losses=int((avg < 0).sum()),
                                        ties=int((avg == 0).sum()), p_wilcoxon=wilcoxon_p(avg)))
                diffs.append(d)
    cols = ["row", "reference", "reference_rows", "protocol", "mode", "seeds", "users", "mean_diff",
            "ci_low", "ci_high", "interval", "wins", "losses", "ties", "p_wilcoxon", "p_holm", "verdict"]
    if not comparisons:
        out = pd.DataFrame(columns=cols)
    else:
        if len({d.shape[1] for d in diffs}) != 1:
            raise FmpaperError("runs disagree on the number of test users; were they made from the same data?")
        # comparisons with the same number of seeds are resampled together (a row not finished
        # for every seed yet has fewer)
        ci = np.empty((len(diffs), 2))
        for n_seeds in sorted({d.shape[0] for d in diffs}):
            idx = [i for i, d in enumerate(diffs) if d.shape[0] == n_seeds]
            ci[idx] = hierarchical_ci(np.stack([diffs[i] for i in idx], 2), n_boot, level)
        out = pd.DataFrame(comparisons)
        out["ci_low"], out["ci_high"] = ci[:, 0], ci[:, 1]
        out["p_holm"] = holm(out["p_wilcoxon"])
        out["verdict"] = verdicts(out, alpha)
        out = out[cols]
    out.attrs.update(dataset=dataset_name(dataset, profile), profile=profile, seeds=seeds, k=k, n_boot=n_boot,
                     level=level, alpha=alpha)
    return out


def verdicts(paired: pd.DataFrame, alpha: float = 0.05) -> list[str]:
    """"better" / "worse" where the Holm-adjusted p is below alpha and the interval lies on that
    side of 0; "not resolved" otherwise."""
    sig = paired["p_holm"] < alpha
    return ["better" if s and lo > 0 else "worse" if s and hi < 0 else "not resolved"
            for s, lo, hi in zip(sig, paired["ci_low"], paired["ci_high"])]


def single_model_ranks(runs: pd.DataFrame, protocol: str, mode: str, metric: str = "ndcg@10") -> pd.DataFrame:
    """For each combined row of a `collect` frame: its mean over seeds in one column and its rank
    among the paper's trained models plus itself (1 = above every single model)."""
    m = mean_over_seeds(runs, protocol, mode, metric)["mean"]
    singles = m.reindex([n for n in trained(paper_only=True) if n in m.index])
    rows_ = [(n, float(m[n]), 1 + int((singles > m[n]).sum())) for n in combined() if n in m.index]
    out = pd.DataFrame(rows_, columns=["row", "mean", "rank"]).set_index("row")
    out.attrs.update(singles=len(singles))
    return out
