"""The figures chapter (notebooks/figures.ipynb): the table as a picture and everything about the
Fisher estimates of the merged models (cost, distance from the exact Fisher, top-k probability
mass, how the Fisher mass splits between the models). Fishers are read from the run cache; a
deleted one is recomputed by `runs.fisher_of`.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..fisher import ESTIMATORS, TAKES_K, probability_mass_topk
from ..merge import fisher_weight_shares
from ..rows import ESTIMATOR_NAMES, FisherSpec, fisher_merges, get_row, labels, row_order, trained
from ..runs import (PAPER_COLUMNS, finished, fisher_of, load, load_paper_table, metrics_of, profile_data, run_dir,
                    validation_inputs)
from .display import (ESTIMATOR_COLORS, ESTIMATOR_MARKERS, MODE_NAMES, PALETTE, check_params, empty, figure, log_ticks,
                      style)

# The poster's reference values (ML-1M, on a GPU; read off the poster's figures, so approximate)
POSTER_TOPK_MASS = {10: 0.381, 30: 0.569, 50: 0.658}
POSTER_FISHER_MINUTES = {  # (estimator, k) -> minutes; approximate, read off an image
    ("target", 1): 0.8,
    ("random", 10): 5.5, ("random", 30): 15.0, ("random", 50): 25.0,
    ("topk", 10): 9.0, ("topk", 30): 25.0, ("topk", 50): 41.5,
    ("model", 10): 4.7, ("model", 30): 12.8, ("model", 50): 20.8,
}


def fisher_costs(dataset=None, profile="quick", seeds=1) -> pd.DataFrame:
    """Seconds of each Fisher computation (per merged model) recorded by the finished merge rows."""
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    found, _ = finished(dataset or None, profile, p["seeds"], fisher_merges())
    recs = []
    for (name, s), d in found.items():
        r = get_row(name)
        for meta in recorded_fishers(d):
            recs.append(dict(row=name, seed=s, estimator=r.estimator, k=r.fisher.items_per_sequence,
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
                     order=[(ESTIMATORS.index(e) if e in ESTIMATORS else 99) for e in costs["estimator"]],
                     kn=costs["k"].fillna(0))
    t = c.groupby(["order", "estimator", "kn", "k"])["seconds"].agg(["mean", "std", "count"]).round(3)
    t = t.droplevel(["order", "kn"])
    t.columns = ["mean seconds per model", "sd", "computations"]
    return t


def recorded_fishers(run) -> list[dict]:
    """The Fisher records (estimator, member run, seconds, hardware, ...) a finished merge run
    wrote when it computed them: its costs as the run measured them, also after the Fisher files
    were deleted or recomputed (a restore brings the record back, not the files)."""
    return metrics_of(run).get("fisher", [])


def _members(name, dataset, profile, seed):
    return [run_dir(m, dataset, profile, seed) for m in get_row(name).members]


def _flat(f: dict) -> torch.Tensor:
    return torch.cat([f[n].double().flatten() for n in sorted(f)])


def fisher_errors(dataset=None, profile="quick", seeds=1, rows=None) -> pd.DataFrame:
    """Each sampled estimator's Fisher against the exact one, per merged model: relative error
    ||F - F*|| / ||F*|| over all parameters, the scale-free error sqrt(1 - cos^2) (the relative
    error after the best rescaling of F) and the estimator's seconds as the merge runs recorded
    them (the exact Fisher's from the fisher_exact row). Fishers are read from the cache the merge
    rows filled (recomputed where missing: after a restore, the exact one if no run made it)."""
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    dataset = dataset or None
    names = [n for n in (fisher_merges() if rows is None else rows) if get_row(n).estimator != "exact"]
    found, _ = finished(dataset, profile, p["seeds"], names)
    # the seconds are the merge runs' records (as the cost table): a Fisher file recomputed later
    # (after a restore, on another machine) times that recomputation, not the run
    exact_runs, _ = finished(dataset, profile, p["seeds"], ["fisher_exact"])
    recorded = {m["run"]: float(m["seconds"]) for d in exact_runs.values() for m in recorded_fishers(d)}
    recs = []
    exact = {}
    for (name, s), d in sorted(found.items()):
        r = get_row(name)
        seconds = {m["run"]: float(m["seconds"]) for m in recorded_fishers(d)}
        for member in _members(name, dataset, profile, s):
            if member not in exact:
                exact[member] = fisher_of(member, FisherSpec("exact"), progress=False)
            fx, mx = exact[member]
            f, meta = fisher_of(member, r.fisher, progress=False)
            a, b = _flat(f), _flat(fx)
            cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0
            recs.append(dict(row=name, seed=s, estimator=r.estimator, k=r.fisher.items_per_sequence, model=member.name.rsplit("-", 1)[0],
                             relative_error=float((a - b).norm() / b.norm()),
                             scale_free_error=math.sqrt(max(0.0, 1 - cos * cos)),
                             seconds=seconds.get(member.name, float(meta["seconds"])),
                             exact_seconds=recorded.get(member.name, float(mx["seconds"]))))
    out = pd.DataFrame(recs, columns=["row", "seed", "estimator", "k", "model", "relative_error",
                                      "scale_free_error", "seconds", "exact_seconds"])
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=p["seeds"])
    return out


def summarize_errors(err: pd.DataFrame) -> pd.DataFrame:
    if err.empty:
        return pd.DataFrame()
    e = err.assign(order=[(ESTIMATORS.index(x) if x in ESTIMATORS else 99) for x in err["estimator"]])
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
    p = check_params(dataset=dataset, profile=profile, seed=seed)
    dataset = dataset or None
    names = fisher_merges() if rows is None else list(rows)
    found, _ = finished(dataset, profile, [p["seed"]], names)
    recs = []
    for name in names:
        if (name, p["seed"]) not in found:
            continue
        r = get_row(name)
        members = _members(name, dataset, profile, p["seed"])
        fishers = [fisher_of(m, r.fisher, progress=False)[0] for m in members]
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
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    dataset = dataset or None
    names = trained() if rows is None else list(rows)
    found, _ = finished(dataset, profile, p["seeds"], names)
    data = profile_data(dataset, profile) if found else None
    recs = []
    for (name, s), d in found.items():
        run = load(d)
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
    t = t.loc[row_order(t.index)]
    t.index = pd.Index(labels(t.index), name="model")
    t.loc["poster (ML-1M, approx.)"] = [POSTER_TOPK_MASS.get(k, np.nan) for k in t.columns]
    t.columns = [f"top {k}" for k in t.columns]
    return (t * 100).round(1).astype(str) + " %"


def plot_paper_vs_ours(runs: pd.DataFrame, paper: pd.DataFrame | None = None, metric: str = "ndcg@10",
                       caption: str | None = None) -> Figure:
    """One panel per mode (FULL, RANDOM, POPULAR): each row's paper value (default: the published
    table) and ours under both protocols (mean over seeds, bar = sd over seeds)."""
    paper = load_paper_table() if paper is None else paper
    agg = runs[runs["metric"] == metric].groupby(["row", "protocol", "mode"])["value"].agg(["mean", "std"])
    names = set(runs["row"]) | (set(paper.index) if paper is not None else set())
    order = row_order(names)
    ticks = labels(order)
    y = np.arange(len(order))[::-1]
    fig = figure(12, 0.32 * len(order) + 1.6, caption)
    axes = fig.subplots(1, 3, sharey=True)
    styles = {"paper": dict(marker="x", color="0.15", s=36, label="paper (ML-1M)"),
              ("ours", "paper"): dict(marker="o", color=PALETTE[0], s=30, label="ours, paper protocol"),
              ("ours", "corrected"): dict(marker="s", color=PALETTE[1], s=26, label="ours, corrected protocol")}
    for ax, mode in zip(axes, ("full", "uni100", "pop100")):
        if paper is not None and (mode, metric) in PAPER_COLUMNS:
            col = PAPER_COLUMNS[(mode, metric)]
            pv = [paper[col].get(n, np.nan) for n in order]
            ax.scatter(pv, y, zorder=3, **styles["paper"])
        for j, protocol in enumerate(("paper", "corrected")):
            m = np.array([agg["mean"].get((n, protocol, mode), np.nan) for n in order])
            sd = np.array([agg["std"].get((n, protocol, mode), np.nan) for n in order])
            off = 0.15 * (1 if j == 0 else -1)
            ax.errorbar(m, y + off, xerr=np.nan_to_num(sd), fmt="none", ecolor=styles[("ours", protocol)]["color"],
                        elinewidth=1, alpha=0.7)
            ax.scatter(m, y + off, zorder=4, **styles[("ours", protocol)])
        ax.set_title(f"{MODE_NAMES[mode]} {metric.upper()}", fontsize=10)
        ax.set_xlabel(metric.upper())
        style(ax)
    axes[0].set_yticks(y, ticks, fontsize=8)
    handles, leg = axes[0].get_legend_handles_labels()
    fig.legend(handles, leg, loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return fig


def plot_fisher_time(costs: pd.DataFrame, poster: dict | None = None, caption: str | None = None) -> Figure:
    """Seconds to compute one model's Fisher against k, one line per sampling scheme (ours, left),
    and the poster's minutes on ML-1M (right, read off its figure)."""
    fig = figure(10, 3.8, caption)
    ax, ax2 = fig.subplots(1, 2)
    if costs.empty:
        empty(ax, "no Fisher merge has been run")
    else:
        c = costs.assign(k=costs["k"].fillna(1).astype(int))
        mean = c.groupby(["estimator", "k"])["seconds"].agg(["mean", "std"]).reset_index()
        for est, g in mean.groupby("estimator", sort=False):
            g = g.sort_values("k")
            kw = dict(color=ESTIMATOR_COLORS.get(est), marker=ESTIMATOR_MARKERS.get(est, "o"),
                      label=ESTIMATOR_NAMES.get(est, est))
            if est == "exact":
                ax.axhline(float(g["mean"].iloc[0]), color=kw["color"], linestyle=":", label="exact (all items)")
            else:
                ax.errorbar(g["k"], g["mean"], yerr=g["std"].fillna(0), capsize=2, **kw)
        ax.set_xlabel("k (items per sequence; target item: 1)")
        ax.set_ylabel("seconds per model")
        ax.set_title(f"Ours ({', '.join(sorted(costs['hardware'].unique()))})", fontsize=9)
        ax.legend(fontsize=8)
        style(ax)
    if poster:
        by = {}
        for (est, k), minutes in poster.items():
            by.setdefault(est, []).append((k, minutes))
        for est, pts in by.items():
            ks, ms = zip(*sorted(pts))
            ax2.plot(ks, ms, color=ESTIMATOR_COLORS.get(est), marker=ESTIMATOR_MARKERS.get(est, "o"),
                     label=ESTIMATOR_NAMES.get(est, est))
        ax2.set_xlabel("k")
        ax2.set_ylabel("minutes")
        ax2.set_title("Poster, ML-1M (approximate, read off its figure)", fontsize=9)
        ax2.legend(fontsize=8)
        style(ax2)
    else:
        empty(ax2, "no poster reference")
    return fig


def plot_topk_mass(mass: pd.DataFrame, poster: dict | None = None, caption: str | None = None) -> Figure:
    """Share of the predicted probability mass held by the top-k items, per trained model, with
    the poster's ML-1M shares as a reference."""
    fig = figure(8, 3.6, caption)
    ax = fig.subplots()
    if mass.empty:
        empty(ax, "no trained run found")
        return fig
    m = mass.groupby(["row", "k"])["mass"].agg(["mean", "std"]).reset_index()
    order = row_order(m["row"].unique())
    ks = sorted(m["k"].unique())
    groups = order + (["poster"] if poster else [])
    width = 0.8 / len(ks)
    x = np.arange(len(groups))
    for j, k in enumerate(ks):
        vals = [m.loc[(m["row"] == r) & (m["k"] == k), "mean"].squeeze() if r != "poster" else poster.get(k, np.nan)
                for r in groups]
        sds = [m.loc[(m["row"] == r) & (m["k"] == k), "std"].squeeze() if r != "poster" else 0 for r in groups]
        err = np.nan_to_num(np.array(sds, float)) * 100
        bars = ax.bar(x + (j - (len(ks) - 1) / 2) * width, np.array(vals, float) * 100, width,
                      yerr=err if err.any() else None, color=PALETTE[j], label=f"top {k}", capsize=2)
        if poster:
            bars[-1].set_hatch("//")
            bars[-1].set_edgecolor("white")
    ax.set_xticks(x, labels(order) + (["poster (ML-1M)"] if poster else []), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("% of predicted probability mass")
    ax.set_ylim(0, 100)
    n_items = mass.attrs.get("n_items")
    ax.set_title("Probability mass in the top-k items" + (f" (of {n_items})" if n_items else ""), fontsize=10)
    ax.legend(fontsize=8)
    style(ax)
    return fig


def plot_weight_shares(shares: pd.DataFrame, caption: str | None = None) -> Figure:
    """Per module, each model's share of the Fisher mass (stacked bars), one panel per Fisher row."""
    rows = list(dict.fromkeys(shares["row"]))
    fig = figure(max(6, 2.6 * max(1, len(rows))), 4.8, caption)
    if not rows:
        empty(fig.subplots(), "no Fisher merge has been run")
        return fig
    axes = np.atleast_1d(fig.subplots(1, len(rows), sharey=True))
    modules = list(dict.fromkeys(shares["module"]))
    models = list(dict.fromkeys(shares["model"]))
    y = np.arange(len(modules))[::-1]
    for ax, r in zip(axes, rows):
        sub = shares[shares["row"] == r]
        left = np.zeros(len(modules))
        for i, model in enumerate(models):
            v = np.array([sub.loc[(sub["module"] == mod) & (sub["model"] == model), "share"].sum() for mod in modules])
            ax.barh(y, v, left=left, color=PALETTE[i], label=model, height=0.8)
            left += v
        ax.axvline(1 / len(models), color="0.2", linestyle=":", linewidth=1)
        est = sub["estimator"].iloc[0]
        k = sub["k"].iloc[0]
        ax.set_title(ESTIMATOR_NAMES.get(est, est) + (f", k={int(k)}" if k and est in TAKES_K else ""),
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of Fisher mass")
        style(ax)
    axes[0].set_yticks(y, modules, fontsize=8)
    handles, leg = axes[0].get_legend_handles_labels()
    fig.legend(handles, leg, loc="outside upper center", ncols=len(models), fontsize=8, frameon=False)
    return fig


def plot_estimator_error(err: pd.DataFrame, caption: str | None = None) -> Figure:
    """Each estimator's error against the exact Fisher vs its seconds per model: relative error
    (left) and scale-free error sqrt(1 - cos^2) (right); one point per estimator and k (mean over
    models and seeds), the exact Fisher's own cost as a vertical line."""
    fig = figure(10, 3.8, caption)
    axes = fig.subplots(1, 2)
    if err.empty:
        for ax in axes:
            empty(ax, "no Fisher merge (or no exact Fisher) found")
        return fig
    m = err.groupby(["estimator", "k"])[["relative_error", "scale_free_error", "seconds", "exact_seconds"]].mean()
    m = m.reset_index()
    for ax, col, title in ((axes[0], "relative_error", "relative error ‖F − F*‖ / ‖F*‖"),
                           (axes[1], "scale_free_error", "scale-free error √(1 − cos²(F, F*))")):
        for est, g in m.groupby("estimator", sort=False):
            ax.scatter(g["seconds"], g[col], color=ESTIMATOR_COLORS.get(est), marker=ESTIMATOR_MARKERS.get(est, "o"),
                       s=40, label=ESTIMATOR_NAMES.get(est, est), zorder=3)
            for _, r in g.iterrows():
                if est != "target":
                    ax.annotate(f"k={int(r['k'])}", (r["seconds"], r[col]), xytext=(4, 3),
                                textcoords="offset points", fontsize=7)
        ax.axvline(float(m["exact_seconds"].mean()), color=ESTIMATOR_COLORS["exact"], linestyle=":",
                   label="cost of the exact Fisher")
        lo = float(min(m["seconds"].min(), m["exact_seconds"].min()))
        log_ticks(ax, lo, float(max(m["seconds"].max(), m["exact_seconds"].max())))
        ax.set_xlabel("seconds per model (log)")
        ax.set_title(title, fontsize=9)
        style(ax)
    axes[0].legend(fontsize=7)
    return fig
