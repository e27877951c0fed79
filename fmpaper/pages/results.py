"""The results chapter (notebooks/results.ipynb): the paper's table beside ours under each
protocol, the paired comparisons and their verdicts, the written tables, and the rows under
several training profiles.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import binomtest, kendalltau

from .. import FmpaperError
from ..config import make_config
from ..data import batches
from ..evaluate import PROTOCOLS
from ..objectives import Objective
from ..rows import labels, row_order
from ..runs import (BATCH_CHECK, PAPER_COLUMNS, PAPER_DATASET, check_nothing_dropped, collect, dataset_name,
                    is_finished, load_paper_table, metrics_of, profile_data, results_dir, run_dir)
from ..stats import (AS_LONG, ONE_SEED, ORACLE, REFERENCES, SELECTED, UNIFORM, mean_over_seeds, paired_tests,
                     single_model_ranks)
from .display import (MODE_NAMES, Captioned, Provenance, Tables, Text, check_params, mean_sd, provenance,
                      published_label, seed_marks, seeds_text, to_markdown)
from .figures import fisher_costs


def side_by_side(df: pd.DataFrame, protocol: str, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Numeric table: index row; columns (quantity, stat) for each paper quantity (e.g. "FULL
    NDCG@10") with stat in paper, ours (mean over seeds), sd (over seeds), n (seeds), diff
    (ours - paper). paper=None reads the published table."""
    if protocol not in PROTOCOLS:
        raise FmpaperError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if paper is None:
        paper = load_paper_table()
    sub = df[df["protocol"] == protocol]
    agg = sub.groupby(["row", "mode", "metric"])["value"].agg(["mean", "std", "count"])
    names = set(sub["row"])
    if paper is not None:
        names |= set(paper.index)
    index = row_order(names)
    cols = {}
    for (mode, metric), pcol in PAPER_COLUMNS.items():
        q = f"{MODE_NAMES[mode]} {metric.upper()}"
        pv = pd.Series([paper[pcol].get(n, np.nan) if paper is not None else np.nan for n in index], index=index)
        ours = pd.Series([agg["mean"].get((n, mode, metric), np.nan) for n in index], index=index)
        sd = pd.Series([agg["std"].get((n, mode, metric), np.nan) for n in index], index=index)
        cnt = pd.Series([agg["count"].get((n, mode, metric), 0) for n in index], index=index)
        cols.update({(q, "paper"): pv, (q, "ours"): ours, (q, "sd"): sd, (q, "n"): cnt, (q, "diff"): ours - pv})
    out = pd.DataFrame(cols)
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["quantity", "stat"])
    out.index.name = "row"
    return out


PAPER_PROTOCOL = "as-run"   # what the authors' code computed: the numbers the paper printed


def show_tables(df: pd.DataFrame, digits: int = 4) -> Tables:
    """The paper's table beside ours under the three protocols, one table per mode (FULL,
    RANDOM, POPULAR); per metric the paper's value, then ours (mean±sd over seeds) under as-run,
    paper and corrected. FULL is the same under every protocol, so it shows once. A difference Δ
    to the paper is taken only like for like: our runs on the paper's dataset under as-run."""
    paper = load_paper_table()
    same = df.attrs.get("dataset") == PAPER_DATASET
    tables = {p: side_by_side(df, p, paper) for p in PROTOCOLS}
    first = tables[PROTOCOLS[0]]
    paper_name = published_label(df.attrs.get("dataset"))

    def num(x, signed=False):
        return "–" if x is None or not np.isfinite(x) else (f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}")

    def ours(t, q):
        return [mean_sd(m, sd, digits) for m, sd in zip(t[(q, "ours")], t[(q, "sd")])]
    seeds = df.attrs.get("seeds", [])
    if same:
        src = f"published: the paper's table (ML-1M, one run per row); Δ = ours under {PAPER_PROTOCOL} − published"
    else:
        src = (f"published: the paper's table (ML-1M), for reference only: ours is {df.attrs.get('dataset')}, "
               f"so no difference is taken")
    note = (f"{src}; ours: mean±sd over {len(seeds)} seed(s) under each protocol (as-run: what the authors' "
            f"code computed; paper: their protocol without its side effect; corrected); a row not finished for "
            f"every seed yet names the seeds it averages; † marks reference rows the paper does not have.")
    names = [a + b for a, b in zip(labels(first.index), seed_marks(df, first.index))]   # the same in every mode
    out = []
    for mode in ("FULL", "RANDOM", "POPULAR"):
        cols = {}
        for q in [q for q in first.columns.get_level_values(0).unique() if q.startswith(mode + " ")]:
            metric = q.removeprefix(mode + " ")
            cols[(metric, paper_name)] = [num(v) for v in first[(q, "paper")]]
            for p in (PROTOCOLS[:1] if mode == "FULL" else PROTOCOLS):
                cols[(metric, "ours" if mode == "FULL" else p)] = ours(tables[p], q)
            if same:
                cols[(metric, "Δ")] = [num(v, True) for v in tables[PAPER_PROTOCOL][(q, "diff")]]
        t = pd.DataFrame(cols, index=pd.Index(names, name="row"))
        t.columns = pd.MultiIndex.from_tuples(t.columns)
        out.append(Captioned(t, f"{mode} · {provenance(df).short}", note))
    return Tables(out)


def column_name(protocol: str, mode: str) -> str:
    return "FULL" if mode == "full" else f"{protocol} {MODE_NAMES[mode]}"


def interval_text(paired: pd.DataFrame) -> str:
    """How the table's intervals and p-values were made, in one sentence."""
    a = paired.attrs
    kinds = sorted(set(paired["interval"])) if len(paired) else []
    how = ("seeds and users resampled together" if kinds == ["seeds and users"] else
           "users resampled" if kinds == ["users"] else "seeds and users, or users alone for one seed")
    return (f"{a.get('level', 0.95):.0%} percentile bootstrap interval ({how}, {a.get('n_boot')} resamples); "
            f"two-sided Wilcoxon signed-rank p of the users' differences averaged over seeds, and that p "
            f"adjusted by Holm over all {len(paired)} comparisons of the paired tables")


def show_paired(paired: pd.DataFrame, reference: str, prov: Provenance | None = None) -> Captioned | Text:
    """One reference's comparisons as 'mean diff [interval] p / Holm p' strings: rows x columns."""
    sub = paired[paired["reference"] == reference]
    k = paired.attrs.get("k", 10)
    if sub.empty:
        return Text(f"No row of this set is compared with the {reference}.")
    cells = {}
    for _, r in sub.iterrows():
        cells.setdefault(r["row"], {})[column_name(r["protocol"], r["mode"])] = (
            f"{r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
            f"p={r['p_wilcoxon']:.2g} / Holm {r['p_holm']:.2g}")
    order = row_order(cells)
    t = pd.DataFrame([cells[n] for n in order], index=pd.Index(labels(order), name="row"))
    refs = ", ".join(sorted(set(", ".join(sub["reference_rows"]).split(", ")))) if len(sub) else "none"
    who = prov.short if prov is not None else (
        f"{paired.attrs.get('dataset')} · profile {paired.attrs.get('profile')} · "
        f"seeds {seeds_text(paired.attrs.get('seeds', []))}")
    note = (f"Per-user NDCG@{k} of the row minus that of the {reference} ({refs}); mean over seeds and "
            f"users [{interval_text(paired)}].")
    return Captioned(t, f"Paired comparison against the {reference} · {who}", note)


VERDICT_COLUMNS = (("paper", "full"), ("corrected", "uni100"), ("corrected", "pop100"))


def verdict(paired: pd.DataFrame) -> Captioned:
    """Which combined rows beat each reference, which lose to it and which are not resolved, in
    FULL and in the corrected sampled modes: rows x (reference, column), each cell "better",
    "worse" or "–" (not resolved). The words follow the Holm-adjusted p-values (stats.verdicts)."""
    a = paired.attrs
    short = {SELECTED: "vs validation-selected", ORACLE: "vs best member (oracle)", UNIFORM: "vs uniform merge",
             ONE_SEED: "vs members of one seed", AS_LONG: "vs best member trained as long (oracle)"}
    cells = {}
    for ref in REFERENCES:
        for protocol, mode in VERDICT_COLUMNS:
            g = paired[(paired["reference"] == ref) & (paired["protocol"] == protocol) & (paired["mode"] == mode)]
            for _, r in g.iterrows():
                word = r["verdict"] if r["verdict"] != "not resolved" else "–"
                cells.setdefault(r["row"], {})[(short[ref], column_name(protocol, mode))] = word
    order = row_order(cells)
    t = pd.DataFrame([cells[n] for n in order], index=pd.Index(labels(order), name="row"))
    if len(t.columns):
        t.columns = pd.MultiIndex.from_tuples(t.columns)
    t = t.fillna("")
    note = (f"Per-user NDCG@{a.get('k', 10)}; better/worse: Holm-adjusted p below {a.get('alpha', 0.05)} and the "
            f"interval on that side of 0, – not resolved ({interval_text(paired)}); {a.get('dataset')}, profile "
            f"{a.get('profile')}, seeds {seeds_text(a.get('seeds', []))}.")
    return Captioned(t, "Which differences survive", note)


def standing(runs: pd.DataFrame, paired: pd.DataFrame) -> Captioned:
    """Each combined row against the single models, per column: its mean, the difference to the
    validation-selected model and to the best member on test (an oracle), and its rank among the
    paper's trained models (1 = above all of them)."""
    cols = {}
    for protocol, mode in VERDICT_COLUMNS:
        c = column_name(protocol, mode)
        ranks = single_model_ranks(runs, protocol, mode, f"ndcg@{paired.attrs.get('k', 10)}")
        cols[(c, "mean")] = ranks["mean"]
        for ref, short in ((SELECTED, "Δ validation-selected"), (ORACLE, "Δ best member (oracle)")):
            g = paired[(paired["reference"] == ref) & (paired["protocol"] == protocol) & (paired["mode"] == mode)]
            cols[(c, short)] = g.set_index("row")["mean_diff"]
        cols[(c, f"rank of {ranks.attrs['singles'] + 1}")] = ranks["rank"]
    t = pd.DataFrame(cols)
    if t.empty:
        return Captioned(t, "Merges against the single models", "no finished combined row")
    t = t.loc[row_order(t.index)]
    t.index = pd.Index(labels(t.index), name="row")
    t.columns = pd.MultiIndex.from_tuples(t.columns)
    note = (f"NDCG@{paired.attrs.get('k', 10)}, mean over seeds {seeds_text(paired.attrs.get('seeds', []))}; "
            f"the validation-selected model is the trained row with the best validation NDCG@10 of each seed; "
            f"the oracle is, per seed and column, the merged member that scores best on test; rank 1 = above "
            f"every one of the paper's trained models.")
    return Captioned(t.round(4), "Merges against the single models", note)


def write_tables(dataset=None, profile="quick", seeds=1, runs: pd.DataFrame | None = None,
                 paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write the long run table, the side-by-side tables (CSV per protocol, Markdown with the
    three side by side), the paired tests (CSV and Markdown) and the seconds of every Fisher computation (CSV) under results/<dataset>-<profile>/. Returns a table of the files written."""
    seeds = check_params(dataset=dataset, profile=profile, seeds=seeds)["seeds"]
    every = collect(dataset or None, profile, seeds)
    check_nothing_dropped(dataset or None, profile, every)
    runs = every if runs is None else runs
    paired = paired_tests(dataset or None, profile, seeds) if paired is None else paired
    out = results_dir(dataset or None, profile)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(runs)
    header = f"<!-- written by fmpaper.pages.results.write_tables; {prov.text()} -->\n\n"
    written = []

    def put(name, text):
        (out / name).write_text(text)
        written.append(name)
    # every row of the profile, both families: what `fmpaper verify` recomputes
    put("runs.csv", every.to_csv(index=False))
    for protocol in PROTOCOLS:
        t = side_by_side(runs, protocol)
        flat = t.copy()
        if not (runs.attrs.get("dataset") == PAPER_DATASET and protocol == PAPER_PROTOCOL):
            flat = flat.drop(columns="diff", level="stat")               # no Δ across datasets/protocols
        flat.columns = [f"{q} {s}" for q, s in flat.columns]
        flat.insert(0, "label", labels(t.index))
        put(f"table_{protocol}.csv", flat.to_csv())
    put("tables.md", header + "".join(f"**{c.caption}**\n\n" + to_markdown(c.table) + f"\n{c.note}\n\n"
                                      for c in show_tables(runs).items))
    put("paired.csv", paired.to_csv(index=False))
    md = header
    for ref in sorted(set(paired["reference"]), key=REFERENCES.index):
        shown = show_paired(paired, ref, prov)
        md += f"**{shown.caption}**\n\n" + to_markdown(shown.table) + f"\n{shown.note}\n\n"
    put("paired.md", md)
    put("fisher_costs.csv", fisher_costs(dataset, profile, seeds).to_csv(index=False))  # per model
    return pd.DataFrame({"file": written}, index=pd.Index([f"results/{out.name}"] * len(written), name="folder"))


def training_lengths(runs: pd.DataFrame) -> Captioned:
    """Each trained row's best epoch (by validation NDCG@10) and epochs run, per seed: whether
    the models had peaked or were still improving when training stopped."""
    t = runs[runs["kind"] == "train"].drop_duplicates(["row", "seed"])
    if t.empty:
        return Captioned(pd.DataFrame(), "Training length of the trained rows", "no finished trained row")
    seeds = sorted(t["seed"].unique())
    out = {}
    for name, g in t.groupby("row"):
        g = g.set_index("seed")
        out[name] = {f"seed {s}": (f"{int(g.loc[s, 'best_epoch'])} of {int(g.loc[s, 'epochs_run'])}"
                                   if s in g.index and pd.notna(g.loc[s, "best_epoch"]) else "–") for s in seeds}
        last = sum(int(g.loc[s, "best_epoch"] == g.loc[s, "epochs_run"]) for s in g.index
                   if pd.notna(g.loc[s, "best_epoch"]))
        out[name]["best at the last epoch"] = f"{last} of {len(g)} seeds"
    order = row_order(out)
    table = pd.DataFrame([out[n] for n in order], index=pd.Index(labels(order), name="row"))
    note = ("best epoch (highest validation NDCG@10, the weights kept) of epochs run; a model whose best "
            "epoch is its last was still improving when training stopped.")
    return Captioned(table, f"Training length of the trained rows · {provenance(runs).short}", note)


def profile_comparison(dataset=None, profiles=("quick", "paper"), protocol: str = "paper",
                       mode: str = "full", metric: str = "ndcg@10") -> Captioned:
    """One metric of every row under each training profile, read back from the runs.csv that
    write_tables left in results/<dataset>-<profile>/ (mean ± sd over that profile's seeds), with
    each row's rank within its profile; the difference and Kendall's tau between the orders are
    those of the first two profiles found."""
    dataset = dataset or make_config(profiles[0]).dataset  # one dataset for every profile
    cols, means, found = {}, {}, []
    for prof in profiles:
        path = results_dir(dataset, prof) / "runs.csv"
        if not path.is_file():
            continue
        df = pd.read_csv(path)
        agg = mean_over_seeds(df, protocol, mode, metric)
        seeds = sorted(df["seed"].unique().tolist())
        name = f"{prof} ({'seed' if len(seeds) == 1 else 'seeds'} {seeds_text(seeds)})"
        means[prof] = agg["mean"]
        cols[(name, "mean")] = agg["mean"]
        cols[(name, "sd")] = agg["std"]
        cols[(name, "rank")] = agg["mean"].rank(ascending=False, method="min")
        found.append(prof)
    if len(found) < 2:
        return Captioned(pd.DataFrame(), "Rows under several training profiles",
                         f"needs results/{dataset}-<profile>/runs.csv of at least two of the profiles "
                         f"{', '.join(profiles)}; found {', '.join(found) or 'none'}.")
    t = pd.DataFrame(cols)
    t = t.loc[row_order(t.index)]
    a, b = means[found[0]].reindex(t.index), means[found[1]].reindex(t.index)
    t[(f"{found[1]} − {found[0]}", "")] = b - a
    ok = a.notna() & b.notna()
    tau = kendalltau(a[ok], b[ok]).statistic if ok.sum() >= 3 else float("nan")
    t.index = pd.Index(labels(t.index), name="row")
    t.columns = pd.MultiIndex.from_tuples(t.columns)
    label = f"{MODE_NAMES[mode]} {metric.upper()}"
    note = (f"{protocol} protocol; rank 1 = best row of that profile; Kendall's tau between the two "
            f"profiles' orders of the {int(ok.sum())} rows both have: {tau:+.2f}. sd is over seeds "
            f"(empty for one seed).")
    return Captioned(t.round(4), f"{label} of every row under each training profile", note)


def single_length_batches(dataset=None, profile="quick", seed=0) -> tuple[int, int]:
    """(batches holding one sequence length, batches) in one epoch of length-grouped batches."""
    cfg = make_config(profile, dataset=dataset)
    lengths = Objective(cfg, profile_data(dataset, profile)).lengths            # (n_examples,), as training sees them
    steps = batches(len(lengths), cfg.batch_size, torch.Generator().manual_seed(seed), lengths)
    return sum(int(lengths[b].min() == lengths[b].max()) for b in steps), len(steps)


def batch_grouping(dataset=None, profile="quick", seeds=(0, 1), names=BATCH_CHECK,
                   noise_seeds=None) -> Captioned:
    """Validation NDCG@10 of rows trained with batches grouped by length (the default) and with
    random batches (`group_by_length=false`, runs made with that override), per seed; the mean
    difference set against the seed-to-seed sd of the grouped runs over `noise_seeds` (default:
    every seed with a finished grouped run among 0..9)."""
    recs, verdicts = {}, []
    for name in names:
        grouped = {s: run_dir(name, dataset, profile, s) for s in range(10)}
        grouped = {s: d for s, d in grouped.items() if is_finished(d)}
        pool = [metrics_of(grouped[s])["valid_ndcg@10"] for s in (noise_seeds or grouped)]
        sd = float(np.std(pool, ddof=1)) if len(pool) > 1 else float("nan")
        diffs = []
        for s in seeds:
            rnd = run_dir(name, dataset, profile, s, group_by_length=False)
            if s not in grouped or not is_finished(rnd):
                continue
            a, b = metrics_of(grouped[s]), metrics_of(rnd)
            diffs.append(b["valid_ndcg@10"] - a["valid_ndcg@10"])
            recs[(labels([name])[0], f"seed {s}")] = {
                "grouped": f"{a['valid_ndcg@10']:.4f}", "random batches": f"{b['valid_ndcg@10']:.4f}",
                "difference": f"{diffs[-1]:+.4f}"}
        if diffs:
            mean = float(np.mean(diffs))
            within = np.isfinite(sd) and abs(mean) <= 2 * sd
            verdicts.append(f"{labels([name])[0]}: mean difference {mean:+.4f} over {len(diffs)} seed(s), seed sd "
                            f"{sd:.4f} over {len(pool)} grouped runs: "
                            + ("within seed noise" if within else "beyond seed noise"))
    if not recs:
        return Captioned(pd.DataFrame(), "Batches grouped by length against random batches",
                         "no run with group_by_length=false yet (fmpaper train --set group_by_length=false)")
    t = pd.DataFrame(recs).T
    t.index.names = ["row", "seed"]
    ups = sum(float(v["difference"]) > 0 for v in recs.values())
    verdicts.append(f"random batches scored higher in {ups} of {len(recs)} pairs (two-sided sign test "
                    f"p = {binomtest(ups, len(recs)).pvalue:.2g})")
    single, total = single_length_batches(dataset, profile)
    note = (f"With grouping, {single} of the {total} batches of an epoch hold a single length (one epoch's draw). "
            "Validation NDCG@10 at the kept epoch; the difference is random − grouped. "
            "Within seed noise: |mean difference| ≤ 2 × the sd of the grouped runs between seeds (the sd "
            "of a difference of two independent runs, averaged over two seeds, is about that sd). "
            + "; ".join(verdicts) + ".")
    return Captioned(t, f"Batches grouped by length against random batches · {dataset_name(dataset, profile)} · "
                        f"profile {profile}", note)
