"""The data chapter (notebooks/data.ipynb): the dataset after preprocessing, its sequence lengths
and item popularity, and the epoch budget of the profile on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..config import make_config
from ..runs import CURVE_EPOCHS, curve_dir, dataset_name, is_finished, metrics_of, profile_data, results_dir
from ..train import hardware
from .display import PALETTE, Text, check_params, empty, figure, log_ticks, style


def data_summary(dataset=None, profile="quick") -> pd.DataFrame:
    """Users, items, interactions, training examples and sequence lengths: the whole dataset
    after the 5-core filter, and the profile's subset when it keeps fewer users."""
    p = check_params(dataset=dataset, profile=profile)
    cfg = make_config(profile, dataset=dataset or None)
    sets = {f"{p['dataset']} after {cfg.min_count}-core": profile_data(dataset or None, profile, max_users=0)}
    if cfg.max_users:
        sets[f"profile {profile} (first {cfg.max_users} users)"] = profile_data(dataset or None, profile)
    rows = {}
    for name, d in sets.items():
        n = d.offsets.diff().double()
        st = d.stats()
        rows[name] = {"users": st["users"], "items": st["items"], "interactions": st["interactions"],
                      "training examples": st["train_examples"],
                      "density": f"{st['interactions'] / (st['users'] * st['items']):.2%}",
                      "mean length": round(float(n.mean()), 1), "median length": int(n.median()),
                      "max length": int(n.max()),
                      f"users longer than {cfg.max_len}": f"{float((n > cfg.max_len).double().mean()):.1%}"}
    t = pd.DataFrame.from_dict(rows, orient="index")
    t.attrs.update(dataset=p["dataset"], profile=profile, max_len=cfg.max_len)
    return t


def sequence_lengths(dataset=None, profile="quick") -> pd.DataFrame:
    """Interactions per user (long: set, user, length) for the whole data and the profile's subset;
    and items' interaction counts in attrs["item_counts"]."""
    check_params(dataset=dataset, profile=profile)
    cfg = make_config(profile, dataset=dataset or None)
    sets = {"all users": profile_data(dataset or None, profile, max_users=0)}
    if cfg.max_users:
        sets[f"profile {profile}"] = profile_data(dataset or None, profile)
    frames = [pd.DataFrame({"set": name, "user": np.arange(d.n_users), "length": d.offsets.diff().numpy()})
              for name, d in sets.items()]
    out = pd.concat(frames, ignore_index=True)
    counts = sets["all users"].item_counts()[1:].numpy()
    out.attrs.update(max_len=cfg.max_len, item_counts=np.sort(counts)[::-1].copy(),
                     dataset=Path(cfg.dataset).stem, profile=profile)
    return out


def figures_dir(dataset=None, profile="quick") -> Path:
    """Where the chapter's figures are saved: results/<dataset>-<profile>/figures/."""
    return results_dir(dataset or None, profile) / "figures"


def machine_caption(dataset=None, profile="quick") -> str:
    """dataset · profile · this machine: the caption of figures made from data, not runs."""
    return f"{dataset_name(dataset or None, profile)} · profile {profile} · {hardware()}"


def plot_sequence_lengths(lengths: pd.DataFrame, caption: str | None = None) -> Figure:
    """Histogram of interactions per user (log x), one colour per set, with the input cut-off
    max_len; and the items' popularity curve (interactions per item, by rank)."""
    fig = figure(10, 3.6, caption)
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
    log_ticks(ax, lengths["length"].min(), lengths["length"].max())
    ax.set_xlabel("interactions per user (log scale)")
    ax.set_ylabel("% of users")
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.88))
    ax.set_title("Sequence lengths", fontsize=10)
    style(ax)
    counts = lengths.attrs.get("item_counts")
    if counts is not None and len(counts):
        ax2.plot(np.arange(1, len(counts) + 1), counts, color=PALETTE[0])
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("item rank by popularity (log)")
        ax2.set_ylabel("interactions (log)")
        ax2.set_title("Item popularity (all users)", fontsize=10)
        style(ax2)
    else:
        empty(ax2, "no item counts")
    return fig


# ----------------------------------------------------------------------------- the epoch budget

def epoch_curve(dataset=None, profile="quick", seed=0) -> pd.DataFrame:
    """Validation NDCG@10 and seconds per epoch of the profile's epoch-budget check (`fmpaper
    curve`: SASRec for CURVE_EPOCHS epochs, never stopped early); no rows when it has not run."""
    check_params(dataset=dataset, profile=profile)
    d = curve_dir(dataset or None, profile, seed)
    history = json.loads((d / "history.json").read_text()) if (d / "history.json").is_file() else []
    t = pd.DataFrame([{"epoch": h["epoch"], "valid NDCG@10": h["valid_ndcg@10"], "seconds": h["seconds"]}
                      for h in history], columns=["epoch", "valid NDCG@10", "seconds"])
    metrics = metrics_of(d) if is_finished(d) else {}
    name = dataset_name(dataset or None, profile)
    cfg = make_config(profile, dataset=dataset or None)
    t.attrs.update(dataset=name, profile=profile, seed=seed, epochs=cfg.epochs, batch_size=cfg.batch_size,
                   examples=metrics.get("data", {}).get("train_examples"), hardware=metrics.get("hardware", ""),
                   command=f"fmpaper curve --dataset {name} --profile {profile} --seed {seed}")
    return t


def curve_summary(curve: pd.DataFrame) -> Text:
    """Where the profile's epoch budget falls on the curve, in one paragraph."""
    a = curve.attrs
    if a["epochs"] >= CURVE_EPOCHS:
        return Text(f"Profile {a['profile']} trains up to {a['epochs']} epochs and stops early on the validation "
                    f"NDCG@10, so it needs no epoch-budget check (that is for profiles of fewer than "
                    f"{CURVE_EPOCHS} epochs).")
    if curve.empty:
        return Text(f"The epoch-budget check has not run for {a['dataset']}, profile {a['profile']} "
                    f"(`{a['command']}` runs it).")
    v = curve.set_index("epoch")["valid NDCG@10"]
    best_epoch, e = int(v.idxmax()), a["epochs"]
    at_budget = v.get(e, np.nan)
    reach = (f"After the profile's {e} epoch(s) its validation NDCG@10 is {at_budget:.4f}, "
             f"{at_budget / v.max():.0%} of the best of the {len(v)} epochs ({v.max():.4f}, epoch {best_epoch})"
             if np.isfinite(at_budget) else f"The curve stops before the profile's {e} epochs")
    steps = (f" An epoch is {a['examples']:,} training examples, about {-(-a['examples'] // a['batch_size']):,} "
             f"optimizer steps of {a['batch_size']}." if a.get("examples") else "")
    return Text(f"SASRec on {a['dataset']} (seed {a['seed']}), trained {len(v)} epochs without early stopping "
                f"at {curve['seconds'].mean():.0f} s per epoch ({a['hardware']}). {reach}; one epoch reaches "
                f"{v.iloc[0] / v.max():.0%} of it.{steps}")


def curve_caption(curve: pd.DataFrame) -> str:
    """dataset · profile · seed · the machine the curve trained on (its record, not this one)."""
    a = curve.attrs
    where = f" · {a['hardware']}" if a.get("hardware") else ""
    return f"{a['dataset']} · profile {a['profile']} · seed {a['seed']}{where}"


def plot_epoch_curve(curve: pd.DataFrame) -> Figure:
    """Validation NDCG@10 by epoch, the profile's epoch budget marked; captioned with the run."""
    fig = figure(6, 3.2, curve_caption(curve))
    ax = fig.subplots()
    if curve.attrs["epochs"] >= CURVE_EPOCHS:
        empty(ax, f"profile {curve.attrs['profile']}: up to {curve.attrs['epochs']} epochs, early stopping")
        return fig
    if curve.empty:
        empty(ax, f"not run: {curve.attrs['command']}")
        return fig
    ax.plot(curve["epoch"], curve["valid NDCG@10"], marker="o", color=PALETTE[0], label="SASRec")
    e = curve.attrs["epochs"]
    ax.axvline(e, color="0.2", linestyle="--", linewidth=1)
    ax.annotate(f"profile {curve.attrs['profile']}: {e} epoch(s)", (e, 0.05), xycoords=("data", "axes fraction"),
                xytext=(4, 0), textcoords="offset points", fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10 (FULL)")
    ax.set_xticks(curve["epoch"])
    ax.set_title(f"Epoch budget, {curve.attrs['dataset']}", fontsize=10)
    style(ax)
    return fig
