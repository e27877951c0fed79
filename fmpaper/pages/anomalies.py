"""The anomalies chapter (notebooks/anomalies.ipynb): the paper's odd numbers, set against chance
and against our own runs.

Three values of the published table (MovieLens-1M) cannot come from a sound evaluation of a
working model, and one row is far below its siblings:

- POPULAR lies below FULL, although 101 candidates are a subset of all items.
- CL4SRec's RANDOM NDCG@20 lies below its NDCG@10; per user NDCG@20 = NDCG@10 + (non-negative
  terms of ranks 11..20), so no single ranking can give that.
- The CL4SRec row itself: its FULL NDCG@10 is less than half of every other trained model's.
(`oddities` states each with the table's numbers.)

The yardstick for the sampled modes is chance (fmpaper.stats.chance_ndcg). Everything here
reads finished runs or re-evaluates their checkpoints; nothing is trained.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from ..evaluate import evaluate
from ..fisher import SAMPLED, TAKES_K
from ..rows import fisher_merges, get_row, labels, rows
from ..runs import dataset_name, is_finished, load, load_paper_table, profile_data, run_dir
from ..stats import CANDIDATES, chance_ndcg, chance_sd, mean_over_seeds
from .display import MODE_NAMES, Captioned, Text, check_params, published_label, runs_table, seeds_text

ML1M_USERS = 6040        # test users of ML-1M after the 5-core filter (`fmpaper data stats ml-1m`)


SAMPLED_COLUMNS = {"random_ndcg10": ("RANDOM", 10), "random_ndcg20": ("RANDOM", 20),
                   "popular_ndcg10": ("POPULAR", 10), "popular_ndcg20": ("POPULAR", 20)}


def oddities() -> Text:
    """The odd values of the published table, read from it, with chance among 101 candidates."""
    paper = load_paper_table()
    below = paper["popular_ndcg10"] < paper["full_ndcg10"]
    cl = paper.loc["cl4srec"]
    others = paper.loc[[n for n in paper.index if n != "cl4srec" and get_row(n).kind == "train"], "full_ndcg10"]
    return Text(f"In the published table (ML-1M): POPULAR NDCG@10 lies below FULL NDCG@10 in {int(below.sum())} of "
                f"{len(paper)} rows. CL4SRec's RANDOM NDCG@20 is {cl['random_ndcg20']:.4f} against its NDCG@10 "
                f"{cl['random_ndcg10']:.4f}. CL4SRec's FULL NDCG@10 is {cl['full_ndcg10']:.4f}, against "
                f"{others.min():.4f} to {others.max():.4f} for the other trained models. Chance among {CANDIDATES} "
                f"candidates: NDCG@10 {chance_ndcg(k=10):.4f}, NDCG@20 {chance_ndcg(k=20):.4f}.")


def paper_vs_chance(users: int = ML1M_USERS) -> Captioned:
    """Every sampled-mode value of the paper's table next to chance, in standard errors of a
    mean over `users` users of a model that ranks at random."""
    paper = load_paper_table()
    t = {}
    for col, (mode, k) in SAMPLED_COLUMNS.items():
        c, se = chance_ndcg(CANDIDATES, k), chance_sd(CANDIDATES, k) / math.sqrt(users)
        t[(f"{mode} NDCG@{k}", "paper")] = paper[col].round(4)
        t[(f"{mode} NDCG@{k}", "z vs chance")] = ((paper[col] - c) / se).round(1)
    out = pd.DataFrame(t)
    out.index = labels(paper.index)
    note = (f"chance among {CANDIDATES} candidates: NDCG@10 {chance_ndcg(k=10):.4f}, NDCG@20 "
            f"{chance_ndcg(k=20):.4f}; z = (paper - chance) / (per-user sd / sqrt({users})), the "
            f"standard error of a mean over ML-1M's {users} test users if the model ranked at random.")
    return Captioned(out, "The paper's sampled columns against a random ranking", note)


def chance_z(users: int = ML1M_USERS) -> pd.DataFrame:
    """Each sampled value of the paper's table as standard errors above chance (rows x columns)."""
    paper = load_paper_table()
    return pd.DataFrame({col: (paper[col] - chance_ndcg(CANDIDATES, k)) / (chance_sd(CANDIDATES, k) / math.sqrt(users))
                         for col, (_, k) in SAMPLED_COLUMNS.items()})


def chance_summary(users: int = ML1M_USERS) -> Text:
    """How many rows of the paper sit at chance in each sampled mode, and how far the others are."""
    z = chance_z(users)
    parts = []
    for mode in ("popular", "random"):
        both = z[[f"{mode}_ndcg10", f"{mode}_ndcg20"]]
        near = (both.abs() < 3).all(1)
        above = (both > 3).all(1)
        text = (f"{mode.upper()}: {int(near.sum())} of {len(z)} rows have both NDCG@10 and NDCG@20 within 3 "
                f"standard errors of chance")
        if len(z) / 2 < near.sum() < len(z):
            text += f" (all but {', '.join(labels(z.index[~near]))})"
        if above.any():
            text += (f"; {int(above.sum())} lie far above it (z from {both[above].min().min():+.0f} to "
                     f"{both[above].max().max():+.0f})")
        parts.append(text)
    cl = z.loc["cl4srec"]
    return Text("In the paper's table, " + "; ".join(parts) + f". CL4SRec's RANDOM values lie at z = "
                f"{cl['random_ndcg10']:+.1f} (NDCG@10) and {cl['random_ndcg20']:+.1f} (NDCG@20): one above "
                f"chance, one below it. z = (paper - chance) / (per-user sd of a random ranking / sqrt({users})).")


def cl4srec_random_pair(users: int = ML1M_USERS) -> Text:
    """Why the paper's CL4SRec RANDOM pair cannot come from one evaluation."""
    paper, z = load_paper_table(), chance_z(users).loc["cl4srec"]
    r10, r20, full = (float(paper.loc["cl4srec", c]) for c in ("random_ndcg10", "random_ndcg20", "full_ndcg10"))
    return Text(f"The paper's CL4SRec RANDOM pair ({r10:.4f}, {r20:.4f}) is not sampler noise: its NDCG@20 lies "
                f"{abs(z['random_ndcg20']):.1f} standard errors {'below' if z['random_ndcg20'] < 0 else 'above'} "
                f"chance while its NDCG@10 lies {abs(z['random_ndcg10']):.1f} "
                f"{'below' if z['random_ndcg10'] < 0 else 'above'}, and NDCG@20 below NDCG@10 is impossible for "
                f"one ranking. Its RANDOM NDCG@10 is also below its own FULL NDCG@10 ({full:.4f}), although a "
                f"target can only rank better among a subset of the items than among all of them.")


def sampler_spread(dataset=None, profile="quick", seed=0, rows=("baseline", "cl4srec"),
                   draws: int = 20) -> Captioned:
    """Re-evaluate finished runs under the paper protocol with `draws` sampler seeds: how much
    the unseeded sampler of the authors moves the sampled metrics of one fixed model."""
    p = check_params(dataset=dataset, profile=profile, seed=seed)
    recs, users = {}, None
    for name in rows:
        d = run_dir(name, dataset or None, profile, p["seed"])
        if not is_finished(d):
            continue
        run = load(d)
        vals = [evaluate(run.model, run.data, "paper", seed=1000 + i) for i in range(draws)]
        for mode in ("uni100", "pop100"):
            for metric in ("ndcg@10", "ndcg@20"):
                v = np.array([x[mode][metric] for x in vals])
                recs[(name, f"{MODE_NAMES[mode]} {metric.upper()}")] = \
                    {"mean": v.mean(), "sd over draws": v.std(ddof=1), "min": v.min(), "max": v.max()}
        users = run.data.n_users
    t = pd.DataFrame(recs).T.round(4)
    note = (f"{p['dataset']}, profile {profile}, seed {p['seed']}: each model evaluated {draws} times under "
            f"the paper protocol with sampler seeds 1000..{999 + draws}"
            + (f" ({users} test users)" if users else "") + ".")
    return Captioned(t, "Spread of the sampled metrics from the negative sampler alone", note)


def _sampled_rows() -> list[str]:
    """The paper's ten Fisher merges with a sampled estimator (random/top-k/model at 3 k, target)."""
    return [n for n in fisher_merges() if rows()[n].paper and rows()[n].estimator in SAMPLED]


def ordering(dataset=None, profile="quick", seeds=1, protocol="paper") -> Captioned:
    """NDCG@10 of the ten sampled Fisher merges in each mode, the paper's and ours, with each
    value's rank among the ten (1 = best) and Kendall's tau between the two orders."""
    paper = load_paper_table()
    df = runs_table(dataset, profile, seeds)
    names = _sampled_rows()
    pub = published_label(dataset_name(dataset or None, profile))
    cols, taus = {}, {}
    for mode, pcol in (("full", "full_ndcg10"), ("uni100", "random_ndcg10"), ("pop100", "popular_ndcg10")):
        ours = mean_over_seeds(df, protocol, mode, "ndcg@10")["mean"].reindex(names) if len(df) else pd.Series(np.nan, index=names)
        pv = paper[pcol].reindex(names)
        m = MODE_NAMES[mode]
        cols[(m, pub)], cols[(m, "ours")] = pv, ours
        cols[(m, f"rank {pub}")] = pv.rank(ascending=False, method="min")
        cols[(m, "rank ours")] = ours.rank(ascending=False, method="min")
        ok = pv.notna() & ours.notna()
        taus[m] = kendalltau(pv[ok], ours[ok]).statistic if ok.sum() >= 3 else float("nan")
    t = pd.DataFrame(cols)
    t.index = [f"{get_row(n).estimator} {get_row(n).k or ''}".strip() for n in names]
    note = (f"ours: {protocol} protocol, mean over seeds {seeds_text(check_params(seeds=seeds)['seeds'])}; Kendall's tau "
            f"between the {pub} order and ours: " + ", ".join(f"{m} {v:+.2f}" for m, v in taus.items()) + ".")
    return Captioned(t.round(4), "Order of the sampling schemes and of k (NDCG@10)", note)


def ordering_summary(dataset=None, profile="quick", seeds=1) -> Text:
    """How far apart the ten sampled Fisher rows are, in the paper and in our runs, against the
    spread of one row between our training seeds (the noise of one unseeded run, measured like
    for like on our data); and whether larger k helps."""
    paper = load_paper_table()
    df = runs_table(dataset, profile, seeds)
    if df.empty:
        return Text("No finished runs to compare orders with.")
    names = _sampled_rows()
    full = mean_over_seeds(df, "paper", "full", "ndcg@10").reindex(names)
    spread_paper = float(paper.loc[names, "full_ndcg10"].max() - paper.loc[names, "full_ndcg10"].min())
    spread_ours = float(full["mean"].max() - full["mean"].min())
    seed_sd = float(full["std"].mean())
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    grow = []
    for scheme in TAKES_K:
        ks = [n for n in names if get_row(n).estimator == scheme]

        def trend(v):
            if any(math.isnan(x) for x in v):
                return "not run"
            return ("rises with k" if v[0] < v[1] < v[2] else "falls with k" if v[0] > v[1] > v[2]
                    else "is not monotone in k")
        grow.append(f"{scheme}: paper {trend([float(paper.loc[n, 'full_ndcg10']) for n in ks])}, "
                    f"ours {trend([float(full['mean'].get(n, np.nan)) for n in ks])}")
    done = int(full["mean"].notna().sum())
    ours = (f"ours span {spread_ours:.4f}" if done > 1 else
            f"{done} of ours {'is' if done == 1 else 'are'} finished, so ours have no spread yet")
    text = (f"The ten sampled Fisher rows of the paper span {spread_paper:.4f} in FULL NDCG@10 (ML-1M, one "
            f"unseeded run each); {ours} ({p['dataset']}, profile {profile}, mean over "
            f"seeds {seeds_text(p['seeds'])}). ")
    if done > 1 and len(p["seeds"]) > 1 and np.isfinite(seed_sd):
        text += (f"One of our rows moves by {seed_sd:.4f} (sd over training seeds, mean over the ten rows) from "
                 f"one seed to the next, so a single run per row resolves differences between rows only when "
                 f"they are several times that; our rows' whole range is {spread_ours / seed_sd:.1f} such sds. ")
    else:
        text += "With one seed, the spread between training seeds is not measured here. "
    return Text(text + "FULL NDCG@10 against k: " + "; ".join(grow) + ".")


def cl4srec_ratios(dataset=None, profile="quick", seeds=1, protocol="paper") -> pd.DataFrame:
    """CL4SRec trained with CE + InfoNCE (our table row) and with InfoNCE alone (the authors'
    later commit), each relative to SASRec, next to the paper's CL4SRec/SASRec ratio; unrounded."""
    paper = load_paper_table()
    df = runs_table(dataset, profile, seeds, names=["baseline", "cl4srec", "cl4srec_infonce"])
    recs = {}
    for mode, pcol in (("full", "full_ndcg10"), ("uni100", "random_ndcg10"), ("pop100", "popular_ndcg10")):
        m = mean_over_seeds(df, protocol, mode, "ndcg@10") if len(df) else pd.DataFrame(columns=["mean", "std"])
        base = m["mean"].get("baseline", np.nan)
        col = f"{MODE_NAMES[mode]} NDCG@10"
        for name in ("baseline", "cl4srec", "cl4srec_infonce"):
            recs.setdefault(name, {})[(col, "ours")] = m["mean"].get(name, np.nan)
            recs[name][(col, "sd")] = m["std"].get(name, np.nan)
            recs[name][(col, "ours / SASRec")] = m["mean"].get(name, np.nan) / base
        recs["baseline"][(col, "paper / SASRec")] = 1.0
        recs["cl4srec"][(col, "paper / SASRec")] = paper.loc["cl4srec", pcol] / paper.loc["baseline", pcol]
    t = pd.DataFrame(recs).T
    t.index = ["SASRec (CE)", "CL4SRec (CE + 0.1 InfoNCE)", "CL4SRec (InfoNCE only)"]
    return t


def cl4srec_check(dataset=None, profile="quick", seeds=1, protocol="paper") -> Captioned:
    """`cl4srec_ratios` as a table, to four decimals."""
    t = cl4srec_ratios(dataset, profile, seeds, protocol)
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    note = (f"ours: {p['dataset']}, profile {profile}, {protocol} protocol, mean and sd over seeds "
            f"{seeds_text(p['seeds'])}; the paper's ratios are from its ML-1M table.")
    return Captioned(t.round(4), "Which CL4SRec did the paper's table report?", note)


def cl4srec_summary(dataset=None, profile="quick", seeds=1, protocol="paper") -> Text:
    """The CL4SRec table above in one paragraph: each variant's FULL NDCG@10 against SASRec,
    against chance over all items, and which lies closer to the paper's ratio."""
    t = cl4srec_ratios(dataset, profile, seeds, protocol)   # unrounded: the ratios below are of the values
    col = ("FULL NDCG@10", "ours / SASRec")
    ce, nce = t[col].iloc[1], t[col].iloc[2]
    paper = load_paper_table()
    if np.isnan(ce) or np.isnan(nce):
        return Text("Not enough finished runs (or no paper table) for this comparison.")
    target = float(paper.loc["cl4srec", "full_ndcg10"] / paper.loc["baseline", "full_ndcg10"])
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    n_items = profile_data(dataset or None, profile).n_items
    chance = chance_ndcg(n_items, 10)
    nce_abs = t[("FULL NDCG@10", "ours")].iloc[2]
    closer = "CE + InfoNCE" if abs(ce - target) < abs(nce - target) else "InfoNCE only"
    return Text(f"FULL NDCG@10 relative to SASRec: CE + InfoNCE {ce:.2f}, InfoNCE only {nce:.2f}, the paper's "
                f"CL4SRec {target:.2f}. The InfoNCE-only model's {nce_abs:.4f} is {nce_abs / chance:.1f} times "
                f"chance over all {n_items} items ({chance:.4f}): without the cross-entropy term nothing "
                f"trains the item embeddings to score the next item. The paper's ratio lies closer to our "
                f"{closer} model"
                + (", between the two" if min(ce, nce) < target < max(ce, nce) else ", outside the two")
                + f" ({p['dataset']}, profile {profile}, seeds {seeds_text(p['seeds'])}).")
