"""The chapter "How the paper's numbers arose" (notebooks/fidelity.ipynb): for each anomaly of
the published table, the mechanism in the authors' code that produces it, reproduced here as a
named switch, and our runs with the switch off and on.

  POPULAR at chance      the `as-run` protocol (fmpaper.evaluate): the popularity sampler
                         shuffles the item column the test inputs are read from
  RANDOM, block form     `as-run` again: consecutive blocks of one shuffled list of items
  CL4SRec far below      `cl4srec_inplace` (fmpaper.objectives): mask and reorder views written
                         into the stored training inputs (row cl4srec_as_run)
  everything near SASRec the [finetuned] rows: copies of one SASRec fine-tuned at lr 1e-4,
                         merged, then trained further with CE

Everything reads finished runs; nothing is trained here.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..rows import get_row, in_family, labels, row_order
from ..runs import finished, load_paper_table
from ..stats import AS_LONG, CANDIDATES, ORACLE, chance_ndcg, chance_sd, mean_over_seeds, paired_tests
from .display import PALETTE, Captioned, Text, empty, figure, mean_sd, provenance, seeds_text, style


# ----------------------------------------------------------------------------- POPULAR and RANDOM

def popular(df: pd.DataFrame) -> Captioned:
    """POPULAR NDCG@10 and @20 per row: the paper's value, ours without the sampler's side effect
    (`paper` protocol) and with it (`as-run`), and chance."""
    paper = load_paper_table()
    names = row_order(set(df["row"]))
    t = {}
    for k, col in ((10, "popular_ndcg10"), (20, "popular_ndcg20")):
        off, on = mean_over_seeds(df, "paper", "pop100", f"ndcg@{k}"), mean_over_seeds(df, "as-run", "pop100", f"ndcg@{k}")
        t[(f"NDCG@{k}", "paper (ML-1M)")] = [f"{paper[col][n]:.4f}" if n in paper.index else "–" for n in names]
        t[(f"NDCG@{k}", "switch off (paper)")] = [mean_sd(off["mean"].get(n, np.nan), off["std"].get(n, np.nan)) for n in names]
        t[(f"NDCG@{k}", "switch on (as-run)")] = [mean_sd(on["mean"].get(n, np.nan), on["std"].get(n, np.nan)) for n in names]
        t[(f"NDCG@{k}", "chance")] = [f"{chance_ndcg(CANDIDATES, k):.4f}"] * len(names)
    out = pd.DataFrame(t, index=pd.Index(labels(names), name="row"))
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    note = (f"ours: mean±sd over seeds; chance: a target at a uniformly random rank among {CANDIDATES} "
            f"candidates. The paper's values are ML-1M; ours {df.attrs.get('dataset')}: chance is the same for both.")
    return Captioned(out, f"POPULAR with the sampler's side effect off and on · {provenance(df).short}", note)


def popular_summary(df: pd.DataFrame, users: int) -> Text:
    """How many rows sit at chance with the side effect on and off, in standard errors of the
    mean over `users` test users and the seeds of a model that ranks at random."""
    if df[df["mode"] == "pop100"].empty:
        return Text("No finished run yet.")
    seeds = df.groupby("row")["seed"].nunique()
    paper = load_paper_table()["popular_ndcg10"]
    parts = []
    for protocol, what in (("as-run", "with the side effect"), ("paper", "without it")):
        m = mean_over_seeds(df, protocol, "pop100", "ndcg@10")["mean"]
        se = chance_sd(CANDIDATES, 10) / np.sqrt(users * seeds.reindex(m.index))
        z = (m - chance_ndcg(CANDIDATES, 10)) / se
        parts.append(f"{what}, {int((z.abs() < 3).sum())} of {len(z)} rows lie within 3 standard errors of chance "
                     f"(NDCG@10 {m.min():.4f} to {m.max():.4f})")
    return Text(f"POPULAR NDCG@10, chance {chance_ndcg(CANDIDATES, 10):.4f}: {parts[0]}; {parts[1]}. The paper's "
                f"values run from {paper.min():.4f} to {paper.max():.4f}. Standard error: per-user sd of a random "
                f"ranking / sqrt(test users × seeds), {users} test users.")


def random_blocks(df: pd.DataFrame) -> Captioned:
    """RANDOM NDCG@10 per row with negatives drawn with replacement (`paper`) and as consecutive
    blocks of one shuffled list (`as-run`), and the difference."""
    names = row_order(set(df["row"]))
    off, on = mean_over_seeds(df, "paper", "uni100", "ndcg@10"), mean_over_seeds(df, "as-run", "uni100", "ndcg@10")
    t = pd.DataFrame({"with replacement (paper)": [mean_sd(off["mean"].get(n, np.nan), off["std"].get(n, np.nan)) for n in names],
                      "blocks of one list (as-run)": [mean_sd(on["mean"].get(n, np.nan), on["std"].get(n, np.nan)) for n in names],
                      "difference": [f"{on['mean'].get(n, np.nan) - off['mean'].get(n, np.nan):+.4f}" for n in names]},
                     index=pd.Index(labels(names), name="row"))
    diff = (on["mean"] - off["mean"]).abs()
    note = (f"RANDOM NDCG@10, mean±sd over seeds; the two forms differ by {diff.mean():.4f} on average "
            f"(at most {diff.max():.4f}) over the {len(diff)} rows.")
    return Captioned(t, f"RANDOM: how the negatives are drawn · {provenance(df).short}", note)


# ----------------------------------------------------------------------------- CL4SRec in place

CL4SREC_ROWS = ("baseline", "cl4srec", "cl4srec_as_run", "cl4srec_infonce")


def cl4srec(df: pd.DataFrame) -> Captioned:
    """FULL NDCG@10 of SASRec and the CL4SRec variants, and each one's ratio to SASRec (per seed,
    then averaged), beside the paper's ratio."""
    full = df[(df["protocol"] == "paper") & (df["mode"] == "full") & (df["metric"] == "ndcg@10")]
    wide = full.pivot_table(index="seed", columns="row", values="value")
    paper = load_paper_table()["full_ndcg10"]
    recs = {}
    for n in CL4SREC_ROWS:
        if n not in wide:
            recs[n] = {"FULL NDCG@10": "not run", "ratio to SASRec": "–"}
            continue
        ratio = (wide[n] / wide["baseline"]) if "baseline" in wide else pd.Series(dtype=float)
        recs[n] = {"FULL NDCG@10": mean_sd(wide[n].mean(), wide[n].std()),
                   "ratio to SASRec": mean_sd(ratio.mean(), ratio.std()) if len(ratio.dropna()) else "–"}
    t = pd.DataFrame(recs).T
    t.index = pd.Index(labels(t.index), name="row")
    ratio = paper["cl4srec"] / paper["baseline"]
    note = (f"ours: mean±sd over {wide.shape[0]} seed(s), the ratio taken per seed. The paper (ML-1M): CL4SRec "
            f"{paper['cl4srec']:.4f} / SASRec {paper['baseline']:.4f} = {ratio:.2f}.")
    return Captioned(t, f"CL4SRec with its augmentations written into the training data · {provenance(df).short}", note)


def mask_fraction(dataset=None, profile="quick", seeds=(0,)) -> pd.DataFrame:
    """Share of the stored training positions holding the mask token after each epoch of the
    cl4srec_as_run runs: columns seed, epoch, fraction. A finished run without its per-epoch
    history (restored from a checkpoint kept without a training record) is left out and named in
    attrs["no_history"]."""
    found, _ = finished(dataset, profile, list(seeds), ["cl4srec_as_run"])
    recs, no_history = [], []
    for (_, s), d in sorted(found.items()):
        if not (d / "history.json").is_file():
            no_history.append(s)
            continue
        for h in json.loads((d / "history.json").read_text()):
            recs.append({"seed": s, "epoch": h["epoch"], "fraction": h.get("mask_fraction", np.nan)})
    out = pd.DataFrame(recs, columns=["seed", "epoch", "fraction"])
    out.attrs["no_history"] = no_history
    return out


def plot_mask_fraction(frac: pd.DataFrame, gamma: float = 0.3, caption: str | None = None):
    fig = figure(5.2, 3.0, caption)
    ax = fig.add_subplot()
    style(ax)
    if frac.empty:
        missing = frac.attrs.get("no_history")
        empty(ax, "no finished cl4srec_as_run run" if not missing else
              f"cl4srec_as_run (seed {', '.join(map(str, missing))}) has no per-epoch history:\n"
              "restored from a checkpoint kept without its training record")
        return fig
    for i, (s, g) in enumerate(frac.groupby("seed")):
        ax.plot([0, *g["epoch"]], [0, *g["fraction"]], marker="o", color=PALETTE[i % len(PALETTE)], label=f"seed {s}")
    # with masks never overwritten, each epoch masks floor(gamma n) of n positions in 2 of 3 examples
    ax.axhline(2 / 3 * gamma, color="0.5", linestyle=":", linewidth=1)
    ax.text(0.2, 2 / 3 * gamma, f" one epoch's masks: ~{2 / 3 * gamma:.2f}", va="bottom", fontsize=7, color="0.4")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mask tokens in the stored\ntraining inputs (share)")
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    return fig


# ----------------------------------------------------------------------------- fine-tuned copies

def _gaps(df: pd.DataFrame, base: pd.DataFrame) -> pd.Series:
    """Per row: FULL NDCG@10 minus that of SASRec of the same seed, averaged over the row's seeds."""
    def full(d):
        d = d[(d["protocol"] == "paper") & (d["mode"] == "full") & (d["metric"] == "ndcg@10")]
        return d.set_index(["row", "seed"])["value"]
    rows_, sasrec = full(df), full(base[base["row"] == "baseline"]).droplevel("row")
    gap = rows_ - sasrec.reindex(rows_.index.get_level_values("seed")).to_numpy()
    return gap.groupby(level="row").mean()


def _seeds(df: pd.DataFrame) -> str:
    return seeds_text(sorted(df["seed"].unique())) if len(df) else "none"


def closeness(scratch: pd.DataFrame, tuned: pd.DataFrame) -> Captioned:
    """Each trained and combined recipe's FULL NDCG@10 minus SASRec's of the same seed, from
    scratch and as the authors ran it (fine-tuned copies of SASRec), beside the paper's."""
    paper = load_paper_table()["full_ndcg10"]
    a, b = _gaps(scratch, scratch), _gaps(tuned, scratch)
    recs = {}
    for name in in_family("finetuned"):
        r = get_row(name)
        src = r.counterpart
        if src is None:                                    # a control without a from-scratch recipe
            continue
        key = labels([src])[0] + (" + CE after merging" if r.finetune_epochs else "")
        recs[key] = {"paper": f"{paper[src] - paper['baseline']:+.4f}" if src in paper.index else "–",
                     "from scratch": f"{a[src]:+.4f}" if src in a.index and not r.finetune_epochs else "–",
                     "fine-tuned copies": f"{b[name]:+.4f}" if name in b.index else "not run"}
    t = pd.DataFrame(recs).T
    t.index.name = "recipe"
    note = (f"FULL NDCG@10 of the recipe minus that of SASRec of the same seed, averaged over seeds (from scratch: "
            f"seeds {_seeds(scratch)}; fine-tuned copies: seeds {_seeds(tuned)}); paper: its row minus its SASRec row "
            f"(ML-1M). Fine-tuned copies start from that SASRec.")
    return Captioned(t, f"Distance to SASRec, from scratch and fine-tuned · {provenance(scratch).short}", note)


def closeness_summary(scratch: pd.DataFrame, tuned: pd.DataFrame) -> Text:
    """The largest distance to SASRec among the DuoRec rows and the merges: paper vs ours."""
    paper = load_paper_table()["full_ndcg10"]
    rowsset = [n for n in paper.index if n not in ("baseline", "cl4srec")]
    p = (paper[rowsset] - paper["baseline"]).abs().max()
    a, b = _gaps(scratch, scratch), _gaps(tuned, scratch)
    a = a.reindex([n for n in rowsset if n in a.index]).abs()
    b = b.reindex([n for n in in_family("finetuned") if get_row(n).counterpart in rowsset and n in b.index]).abs()
    ours = (f"from scratch {a.max():.4f} over {len(a)} rows (seeds {_seeds(scratch)})" if len(a) else "from scratch: not run")
    ft = (f"as fine-tuned copies {b.max():.4f} over {len(b)} rows (seeds {_seeds(tuned)})" if len(b) else
          "as fine-tuned copies: not run yet")
    return Text(f"Largest distance of a DuoRec row or a merge from SASRec of the same seed (FULL NDCG@10): the "
                f"paper {p:.4f} over {len(rowsset)} rows; ours {ours}; ours {ft}.")


def merges_vs_members(dataset=None, profile="quick", seeds=(0,)) -> Captioned:
    """Per merge recipe and family: the FULL NDCG@10 difference to the best member on test
    (an oracle), with its verdict (Holm over each family's own comparisons); for merges trained
    further, also to the best member trained as long (the budget-matched control)."""
    cols, used, family_size, tally = {}, {}, {}, {}
    for family, title in (("scratch", "members trained from scratch"), ("finetuned", "fine-tuned copies")):
        paired = paired_tests(dataset, profile, list(seeds), family=family)
        found, _ = finished(dataset, profile, list(seeds), in_family(family))
        used[title] = {s for _, s in found}
        family_size[title] = len(paired)
        sub = paired[paired["reference"].isin([ORACLE, AS_LONG]) & (paired["protocol"] == "paper")
                     & (paired["mode"] == "full")]
        for _, r in sub.iterrows():
            row = get_row(r["row"])
            if row.seed_shift:
                continue
            recipe = row.counterpart or row.name
            col = title + (", then CE" if row.finetune_epochs else "")
            if r["reference"] == AS_LONG:
                col += ", vs members trained as long"
            cols.setdefault(col, {})[recipe] = f"{r['mean_diff']:+.4f} {r['verdict']}"
            tally.setdefault(col, []).append((r["mean_diff"], r["verdict"]))
    order = row_order({n for c in cols.values() for n in c})
    t = pd.DataFrame({c: [v.get(n, "–") for n in order] for c, v in cols.items()},
                     index=pd.Index(labels(order), name="recipe"))
    note = ("Per-user FULL NDCG@10 of the merge minus that of its best member on test (chosen per seed), mean over "
            "seeds and users; \"vs members trained as long\": minus the best of its members trained the same extra "
            "CE epochs (rows <member>_tuned). Verdict from the Holm-adjusted Wilcoxon p and the bootstrap interval, "
            "as on the results page, each family adjusted over all its own paired comparisons (every merge, "
            "reference, protocol and mode: " + ", ".join(f"{fam} {n}" for fam, n in family_size.items())
            + "). Seeds: " + "; ".join(f"{fam} {', '.join(map(str, sorted(s)))}" for fam, s in used.items()) + ". "
            + " ".join(f"{col}: {_tally(v)}." for col, v in tally.items()))
    return Captioned(t, "Do merges beat their members?", note)


def _tally(cells: list) -> str:
    """'a better, b worse, c not resolved of n, mean difference x' over one column's comparisons."""
    words = [w for _, w in cells]
    return (", ".join(f"{words.count(w)} {w}" for w in ("better", "worse", "not resolved") if w in words)
            + f" of {len(cells)}, mean difference {np.mean([d for d, _ in cells]):+.4f}")


# ----------------------------------------------------------------------------- what stays unexplained

def unexplained() -> Text:
    paper = load_paper_table()
    r10, r20 = float(paper.loc["cl4srec", "random_ndcg10"]), float(paper.loc["cl4srec", "random_ndcg20"])
    return Text(f"CL4SRec's RANDOM NDCG@20 ({r20:.4f}) lies below its NDCG@10 ({r10:.4f}) and below chance "
                f"({chance_ndcg(CANDIDATES, 20):.4f}). For one ranking NDCG@20 is NDCG@10 plus non-negative "
                f"terms, so no single evaluation produces this pair, with or without any switch above.")
