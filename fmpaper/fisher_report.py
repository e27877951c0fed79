"""Fisher estimates read back from finished merge rows: what each cost, how far each sampled
estimator lies from the exact Fisher, how much probability the top-k items hold, and how the
Fisher mass splits between the merged models. The data of the Fisher figures of the book
(`fmpaper.figures` draws them); nothing here trains, and a deleted Fisher file is recomputed by
`experiments.fisher_of`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import torch

from .results import _data_for, _labels, _row_order, _run_dirs, check_params

# The poster's reference values for the figures (protocol.md; ML-1M, read off the poster).
POSTER_TOPK_MASS = {10: 0.381, 30: 0.569, 50: 0.658}
POSTER_FISHER_MINUTES = {  # (estimator, k) -> minutes; approximate, read off an image
    ("target", 1): 0.8,
    ("random", 10): 5.5, ("random", 30): 15.0, ("random", 50): 25.0,
    ("topk", 10): 9.0, ("topk", 30): 25.0, ("topk", 50): 41.5,
    ("model", 10): 4.7, ("model", 30): 12.8, ("model", 50): 20.8,
}
_ESTIMATOR_ORDER = ("exact", "target", "random", "topk", "model")
ESTIMATOR_NAMES = {"exact": "exact", "target": "target item", "random": "random sampling",
                   "topk": "top-k sampling", "model": "model-based sampling"}


def _fisher_rows(rows=None):
    from .experiments import rows as all_rows
    names = [n for n, r in all_rows().items() if r.kind == "merge" and r.method == "fisher"]
    return names if rows is None else [n for n in rows if n in names]


def fisher_costs(dataset=None, profile="quick", seeds=1) -> pd.DataFrame:
    """Seconds of each Fisher computation (per merged model) recorded by the finished merge rows."""
    from .experiments import get_row
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    found, _ = _run_dirs(dataset or None, profile, p["seeds"], _fisher_rows())
    recs = []
    for (name, s), d in found.items():
        r = get_row(name)
        for meta in json.loads((d / "metrics.json").read_text()).get("fisher", []):
            recs.append(dict(row=name, seed=s, estimator=r.estimator, k=r.k if r.estimator != "exact" else None,
                             batchwise=r.batchwise, model=meta.get("run"), seconds=float(meta["seconds"]),
                             sequences=meta.get("sequences"), hardware=meta.get("hardware", "?")))
    out = pd.DataFrame(recs, columns=["row", "seed", "estimator", "k", "batchwise", "model", "seconds",
                                      "sequences", "hardware"])
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=p["seeds"])
    return out


def summarize_costs(costs: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per model for each estimator and k."""
    if costs.empty:
        return pd.DataFrame()
    c = costs.assign(k=[("all items" if e == "exact" else str(int(k))) for e, k in zip(costs["estimator"], costs["k"])],
                     order=[(_ESTIMATOR_ORDER.index(e) if e in _ESTIMATOR_ORDER else 99) for e in costs["estimator"]],
                     kn=costs["k"].fillna(0))
    t = c.groupby(["order", "estimator", "kn", "k"])["seconds"].agg(["mean", "std", "count"]).round(3)
    t = t.droplevel(["order", "kn"])
    t.columns = ["mean seconds per model", "sd", "computations"]
    return t


def _members(name, dataset, profile, seed):
    from .experiments import get_row, run_dir
    return [run_dir(m, dataset, profile, seed) for m in get_row(name).members]


def _flat(f: dict) -> torch.Tensor:
    return torch.cat([f[n].double().flatten() for n in sorted(f)])


def fisher_errors(dataset=None, profile="quick", seeds=1, rows=None) -> pd.DataFrame:
    """Each sampled estimator's Fisher against the exact one, per merged model: relative error
    ||F - F*|| / ||F*|| over all parameters, the scale-free error sqrt(1 - cos^2) (the relative
    error after the best rescaling of F) and the estimator's seconds. Fishers are read from the
    cache the merge rows filled (the exact one is computed if no run made it yet)."""
    from .experiments import fisher_of, get_row
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    dataset = dataset or None
    names = [n for n in _fisher_rows(rows) if get_row(n).estimator != "exact"]
    found, _ = _run_dirs(dataset, profile, p["seeds"], names)
    recs = []
    exact = {}
    for (name, s), d in sorted(found.items()):
        r = get_row(name)
        for member in _members(name, dataset, profile, s):
            if member not in exact:
                exact[member] = fisher_of(member, "exact", progress=False)
            fx, mx = exact[member]
            f, meta = fisher_of(member, r.estimator, r.k, r.batchwise, progress=False)
            a, b = _flat(f), _flat(fx)
            cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0
            recs.append(dict(row=name, seed=s, estimator=r.estimator, k=r.k, model=member.name.rsplit("-", 1)[0],
                             relative_error=float((a - b).norm() / b.norm()),
                             scale_free_error=math.sqrt(max(0.0, 1 - cos * cos)),
                             seconds=float(meta["seconds"]), exact_seconds=float(mx["seconds"])))
    out = pd.DataFrame(recs, columns=["row", "seed", "estimator", "k", "model", "relative_error",
                                      "scale_free_error", "seconds", "exact_seconds"])
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=p["seeds"])
    return out


def summarize_errors(err: pd.DataFrame) -> pd.DataFrame:
    if err.empty:
        return pd.DataFrame()
    e = err.assign(order=[(_ESTIMATOR_ORDER.index(x) if x in _ESTIMATOR_ORDER else 99) for x in err["estimator"]])
    g = e.groupby(["order", "estimator", "k"])
    t = g[["relative_error", "scale_free_error", "seconds"]].mean()
    t["cost / exact cost"] = t["seconds"] / g["exact_seconds"].mean()
    t = t.droplevel("order").round(4)
    t.columns = ["relative error", "scale-free error", "seconds per model", "cost / exact cost"]
    return t


def module_of(name: str) -> str:
    """Parameter name -> its module (item_emb, pos_emb, ln, blocks.0.qkv, ...)."""
    return name.rsplit(".", 1)[0] if "." in name else name


_SUBLAYERS = ("qkv", "proj", "ln1", "fc1", "fc2", "ln2")


def module_order(module: str) -> tuple:
    """Sort key: modules in the order the network applies them."""
    parts = module.split(".")
    if parts[0] == "blocks" and len(parts) == 3 and parts[1].isdigit():
        sub = _SUBLAYERS.index(parts[2]) if parts[2] in _SUBLAYERS else len(_SUBLAYERS)
        return (1, int(parts[1]), sub, parts[2])
    first = ("item_emb", "pos_emb", "ln")
    return (0, first.index(module) if module in first else len(first), 0, module)


def weight_shares(dataset=None, profile="quick", seed=0, rows=None) -> pd.DataFrame:
    """Share of each merged model in the Fisher mass of each module (merge.fisher_weight_shares on
    the module's parameters together), per Fisher merge row: long (row, estimator, k, module,
    model, share)."""
    from .experiments import fisher_of, get_row
    from .merge import fisher_weight_shares
    p = check_params(dataset=dataset, profile=profile, seed=seed)
    dataset = dataset or None
    names = _fisher_rows(rows)
    found, _ = _run_dirs(dataset, profile, [p["seed"]], names)
    recs = []
    for name in names:
        if (name, p["seed"]) not in found:
            continue
        r = get_row(name)
        members = _members(name, dataset, profile, p["seed"])
        fishers = [fisher_of(m, r.estimator, r.k, r.batchwise, progress=False)[0] for m in members]
        modules = {}
        for pname in sorted(fishers[0], key=lambda n: module_order(module_of(n))):
            modules.setdefault(module_of(pname), []).append(pname)
        grouped = [{mod: torch.cat([f[n].flatten() for n in ps]) for mod, ps in modules.items()} for f in fishers]
        for mod, shares in fisher_weight_shares(grouped).items():
            for member_row, share in zip(r.members, shares):
                recs.append(dict(row=name, estimator=r.estimator, k=r.k, module=mod, model=member_row, share=share))
    out = pd.DataFrame(recs, columns=["row", "estimator", "k", "module", "model", "share"])
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=[p["seed"]])
    return out


def topk_mass(dataset=None, profile="quick", seeds=1, rows=None, ks=(10, 30, 50)) -> pd.DataFrame:
    """Mean share of the predicted probability mass in the top-k items (fisher.probability_mass_topk)
    of each trained row, over its validation inputs: long (row, seed, k, mass)."""
    from .experiments import rows as all_rows
    from .experiments import validation_inputs
    from .fisher import probability_mass_topk
    from .train import load_run
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    dataset = dataset or None
    names = [n for n, r in all_rows().items() if r.kind == "train"] if rows is None else list(rows)
    found, _ = _run_dirs(dataset, profile, p["seeds"], names)
    data = _data_for(dataset, profile) if found else None
    recs = []
    for (name, s), d in found.items():
        run = load_run(d, data=data)
        seq, lengths, _ = validation_inputs(run.data)
        ks_ok = [k for k in ks if k <= run.data.n_items]
        for k, v in probability_mass_topk(run.model, seq, lengths, ks_ok).items():
            recs.append(dict(row=name, seed=s, k=k, mass=v))
    out = pd.DataFrame(recs, columns=["row", "seed", "k", "mass"])
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=p["seeds"],
                     n_items=data.n_items if data is not None else None)
    return out


def summarize_mass(mass: pd.DataFrame) -> pd.DataFrame:
    if mass.empty:
        return pd.DataFrame()
    t = mass.groupby(["row", "k"])["mass"].mean().unstack("k")
    t = t.loc[_row_order(t.index)]
    t.index = pd.Index(_labels(t.index), name="model")
    t.loc["poster (ML-1M, approx.)"] = [POSTER_TOPK_MASS.get(k, np.nan) for k in t.columns]
    t.columns = [f"top {k}" for k in t.columns]
    return (t * 100).round(1).astype(str) + " %"
