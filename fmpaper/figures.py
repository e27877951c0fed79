"""The book's figures: each function takes data (from fmpaper.results) and returns a Figure.

Figures are built with the object-oriented API (matplotlib.figure.Figure, no pyplot state), so
nothing leaks between calls; `publish` saves one as PNG and returns an image to display.
Every figure carries a small provenance line (dataset, profile, seeds, hardware) at the bottom.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .fisher_report import ESTIMATOR_NAMES
from .results import MODE_NAMES, PAPER_COLUMNS, _labels, _row_order

DPI = 110
PALETTE = sns.color_palette("colorblind")
ESTIMATOR_COLORS = {"exact": PALETTE[7], "target": PALETTE[3], "random": PALETTE[0], "topk": PALETTE[1],
                    "model": PALETTE[2]}
ESTIMATOR_MARKERS = {"exact": "*", "target": "D", "random": "o", "topk": "s", "model": "^"}


def _figure(w: float, h: float, caption: str | None) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    if caption:
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="0.35")
    return fig


def _style(ax) -> None:
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _log_ticks(ax, lo, hi) -> None:
    """Log x axis with plain 1-2-5 tick labels."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    ax.set_xscale("log")
    ticks = [m * 10 ** e for e in range(-3, 7) for m in (1, 2, 5) if lo / 1.5 <= m * 10 ** e <= hi * 1.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def publish(fig: Figure, name: str, folder: str | Path):
    """Save `fig` as folder/name.png and return it as an image for the notebook to display."""
    from IPython.display import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    png = buf.getvalue()
    (folder / f"{name}.png").write_bytes(png)
    return Image(data=png, format="png")


# ----------------------------------------------------------------------------- data

def sequence_lengths(lengths: pd.DataFrame, caption: str | None = None) -> Figure:
    """Histogram of interactions per user (log x), one colour per set, with the input cut-off
    max_len; and the items' popularity curve (interactions per item, by rank)."""
    fig = _figure(10, 3.6, caption)
    ax, ax2 = fig.subplots(1, 2, width_ratios=(3, 2))
    sets = list(dict.fromkeys(lengths["set"]))
    bins = np.logspace(np.log10(max(1, lengths["length"].min())), np.log10(lengths["length"].max() + 1), 40)
    for i, s in enumerate(sets):
        v = lengths.loc[lengths["set"] == s, "length"]
        ax.hist(v, bins=bins, weights=np.full(len(v), 100.0 / max(1, len(v))), color=PALETTE[i],
                alpha=0.55 if len(sets) > 1 else 0.85, label=f"{s} ({len(v)} users)")
    max_len = lengths.attrs.get("max_len")
    if max_len:
        ax.axvline(max_len, color="0.2", linestyle="--", linewidth=1)
        ax.annotate(f"inputs keep the last {max_len} items", (max_len, 0.95), xycoords=("data", "axes fraction"),
                    xytext=(4, 0), textcoords="offset points", fontsize=8, va="top")
    _log_ticks(ax, lengths["length"].min(), lengths["length"].max())
    ax.set_xlabel("interactions per user (log scale)")
    ax.set_ylabel("% of users")
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.88))
    ax.set_title("Sequence lengths", fontsize=10)
    _style(ax)
    counts = lengths.attrs.get("item_counts")
    if counts is not None and len(counts):
        ax2.plot(np.arange(1, len(counts) + 1), counts, color=PALETTE[0])
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("item rank by popularity (log)")
        ax2.set_ylabel("interactions (log)")
        ax2.set_title("Item popularity (all users)", fontsize=10)
        _style(ax2)
    else:
        _empty(ax2, "no item counts")
    return fig


# ----------------------------------------------------------------------------- the table

def paper_vs_ours(runs: pd.DataFrame, paper: pd.DataFrame | None, metric: str = "ndcg@10",
                  caption: str | None = None) -> Figure:
    """One panel per mode (FULL, RANDOM, POPULAR): each row's paper value and ours under both
    protocols (mean over seeds, bar = sd over seeds)."""
    agg = runs[runs["metric"] == metric].groupby(["row", "protocol", "mode"])["value"].agg(["mean", "std"])
    names = set(runs["row"]) | (set(paper.index) if paper is not None else set())
    order = _row_order(names)
    labels = _labels(order)
    y = np.arange(len(order))[::-1]
    fig = _figure(12, 0.32 * len(order) + 1.6, caption)
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
        _style(ax)
    axes[0].set_yticks(y, labels, fontsize=8)
    handles, leg = axes[0].get_legend_handles_labels()
    fig.legend(handles, leg, loc="outside upper center", ncols=3, fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------- Fisher

def fisher_time(costs: pd.DataFrame, poster: dict | None = None, caption: str | None = None) -> Figure:
    """Seconds to compute one model's Fisher against k, one line per sampling scheme (ours, left),
    and the poster's minutes on ML-1M (right, read off its figure)."""
    fig = _figure(10, 3.8, caption)
    ax, ax2 = fig.subplots(1, 2)
    if costs.empty:
        _empty(ax, "no Fisher merge has been run")
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
        _style(ax)
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
        _style(ax2)
    else:
        _empty(ax2, "no poster reference")
    return fig


def topk_mass(mass: pd.DataFrame, poster: dict | None = None, caption: str | None = None) -> Figure:
    """Share of the predicted probability mass held by the top-k items, per trained model, with
    the poster's ML-1M shares as a reference."""
    fig = _figure(8, 3.6, caption)
    ax = fig.subplots()
    if mass.empty:
        _empty(ax, "no trained run found")
        return fig
    m = mass.groupby(["row", "k"])["mass"].agg(["mean", "std"]).reset_index()
    order = _row_order(m["row"].unique())
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
    ax.set_xticks(x, _labels(order) + (["poster (ML-1M)"] if poster else []), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("% of predicted probability mass")
    ax.set_ylim(0, 100)
    n_items = mass.attrs.get("n_items")
    ax.set_title("Probability mass in the top-k items" + (f" (of {n_items})" if n_items else ""), fontsize=10)
    ax.legend(fontsize=8)
    _style(ax)
    return fig


def weight_shares(shares: pd.DataFrame, caption: str | None = None) -> Figure:
    """Per module, each model's share of the Fisher mass (stacked bars), one panel per Fisher row."""
    rows = list(dict.fromkeys(shares["row"]))
    fig = _figure(max(6, 2.6 * max(1, len(rows))), 4.8, caption)
    if not rows:
        _empty(fig.subplots(), "no Fisher merge has been run")
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
        ax.set_title(ESTIMATOR_NAMES.get(est, est) + (f", k={int(k)}" if k and est not in ("exact", "target") else ""),
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of Fisher mass")
        _style(ax)
    axes[0].set_yticks(y, modules, fontsize=8)
    handles, leg = axes[0].get_legend_handles_labels()
    fig.legend(handles, leg, loc="outside upper center", ncols=len(models), fontsize=8, frameon=False)
    return fig


def estimator_error(err: pd.DataFrame, caption: str | None = None) -> Figure:
    """Each estimator's error against the exact Fisher vs its seconds per model: relative error
    (left) and scale-free error sqrt(1 - cos^2) (right); one point per estimator and k (mean over
    models and seeds), the exact Fisher's own cost as a vertical line."""
    fig = _figure(10, 3.8, caption)
    axes = fig.subplots(1, 2)
    if err.empty:
        for ax in axes:
            _empty(ax, "no Fisher merge (or no exact Fisher) found")
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
        _log_ticks(ax, lo, float(max(m["seconds"].max(), m["exact_seconds"].max())))
        ax.set_xlabel("seconds per model (log)")
        ax.set_title(title, fontsize=9)
        _style(ax)
    axes[0].legend(fontsize=7)
    return fig
