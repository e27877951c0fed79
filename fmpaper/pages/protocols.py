"""The protocols chapter (notebooks/protocols.ipynb): what the 100 sampled negatives of each
protocol hold, and how often a target ranks worse among the 101 POPULAR candidates than among
all items (impossible under a sound sampled protocol). Read back from finished runs.
"""
from __future__ import annotations

import pandas as pd
import torch

from ..evaluate import PROTOCOLS, ndcg, sample_negatives, user_item_mask
from ..rows import labels, row_order
from ..runs import finished, profile_data, ranks_of
from .display import MODE_NAMES, Text, check_params, seed_marks, seeds_text


def sampler_diagnostics(dataset=None, profile="quick", seeds=1) -> pd.DataFrame:
    """What the 100 negatives of each protocol and mode hold, averaged over users and seeds: distinct
    items, copies of the target, items of the user's own sequence, users whose negatives include
    the target. Drawn exactly as in evaluation (evaluate.sample_negatives with the run's seeds)."""
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    data = profile_data(dataset or None, profile)
    target = data.items[data.eval_targets("test")]
    mine = user_item_mask(data)
    out = []
    for protocol in PROTOCOLS:
        for mode, key, off in (("uni", "uni100", 0), ("pop", "pop100", 1)):
            vals = []
            for s in p["seeds"]:
                neg = sample_negatives(data, mode, protocol, seed=s + off)
                srt = neg.sort(1).values
                distinct = (srt.diff(dim=1) != 0).sum(1) + 1
                copies = (neg == target[:, None]).sum(1)
                own = mine.gather(1, neg).sum(1)
                vals.append([distinct.double().mean(), copies.double().mean(), own.double().mean(),
                             (copies > 0).double().mean()])
            v = torch.tensor(vals).mean(0).tolist()
            out.append({"protocol": protocol, "mode": MODE_NAMES[key],
                        "distinct negatives": round(v[0], 2), "copies of the target": round(v[1], 3),
                        "negatives from the user's own items": round(v[2], 2),
                        "users with the target among negatives": f"{v[3]:.1%}"})
    t = pd.DataFrame(out).set_index(["protocol", "mode"])
    t.attrs.update(dataset=p["dataset"], profile=profile, seeds=p["seeds"], users=data.n_users)
    return t


def rank_stats(dataset=None, profile="quick", seeds=1, rows=None) -> pd.DataFrame:
    """Numeric, per row and protocol (means over seeds): share of users ranked worse among the
    101 POPULAR candidates than among all items (impossible for a sound sampled protocol), and
    mean NDCG@10 in FULL and POPULAR; seed_mark names the seeds of a row that has only some."""
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    found, _ = finished(dataset or None, profile, p["seeds"], rows)
    recs = []
    for (name, s), d in found.items():
        r = ranks_of(d)
        for protocol in PROTOCOLS:
            full, pop = r[f"{protocol}.full"], r[f"{protocol}.pop100"]
            recs.append(dict(row=name, seed=s, protocol=protocol,
                             pop_worse=float((pop > full).double().mean()),
                             full_ndcg10=float(ndcg(full, 10).mean()), pop_ndcg10=float(ndcg(pop, 10).mean())))
    per_seed = pd.DataFrame(recs, columns=["row", "seed", "protocol", "pop_worse", "full_ndcg10", "pop_ndcg10"])
    per_seed.attrs.update(seeds=p["seeds"])
    out = per_seed.groupby(["row", "protocol"], as_index=False)[["pop_worse", "full_ndcg10", "pop_ndcg10"]].mean()
    out["seed_mark"] = seed_marks(per_seed, out["row"])            # rows with only some of the seeds
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=p["seeds"])
    return out


def rank_diagnostics(dataset=None, profile="quick", seeds=1, rows=None) -> pd.DataFrame:
    """`rank_stats` for display: rows x (protocol, quantity)."""
    st = rank_stats(dataset, profile, seeds, rows)
    out, marks = {}, dict(zip(st["row"], st["seed_mark"]))
    for _, r in st.iterrows():
        row = out.setdefault(r["row"], {})
        row[(r["protocol"], "users with POPULAR rank > FULL rank")] = f"{r['pop_worse']:.1%}"
        row[(r["protocol"], "FULL NDCG@10")] = round(r["full_ndcg10"], 4)
        row[(r["protocol"], "POPULAR NDCG@10")] = round(r["pop_ndcg10"], 4)
    order = row_order(out)
    names = [a + marks[n] for a, n in zip(labels(order), order)]
    t = pd.DataFrame([out[n] for n in order], index=pd.Index(names, name="row"))
    if len(t.columns):
        cols = [c for protocol in PROTOCOLS for c in t.columns if c[0] == protocol]
        t = t[cols]
        t.columns = pd.MultiIndex.from_tuples(cols)
    return t


def popular_vs_full(dataset=None, profile="quick", seeds=1) -> Text:
    """One paragraph: in how many rows mean POPULAR NDCG@10 lies below FULL, per protocol, and
    how many (user, row) pairs rank worse among the POPULAR candidates than among all items."""
    st = rank_stats(dataset, profile, seeds)
    if st.empty:
        return Text("No finished run: nothing to compare yet.")
    parts = []
    for protocol in PROTOCOLS:
        sub = st[st["protocol"] == protocol]
        below = int((sub["pop_ndcg10"] < sub["full_ndcg10"]).sum())
        parts.append(f"under the {protocol} protocol, mean POPULAR NDCG@10 lies below FULL NDCG@10 in {below} "
                     f"of {len(sub)} rows, and on average {sub['pop_worse'].mean():.1%} of the users rank "
                     f"worse among the 101 POPULAR candidates than among all items")
    prov = f"{st.attrs['dataset']}, profile {st.attrs['profile']}, seeds {seeds_text(st.attrs['seeds'])}"
    partial = st.drop_duplicates("row")["seed_mark"].astype(bool).sum()
    if partial:
        prov += f"; {partial} of the {st['row'].nunique()} rows so far for only the seeds the table names"
    return Text(f"In these runs ({prov}): " + "; ".join(parts) + ".")
