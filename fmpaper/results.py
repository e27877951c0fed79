"""Finished runs read back: the table against the paper, paired tests, the profiles compared.

Everything here reads what `fmpaper.experiments` wrote under the runs root (nothing is trained,
except that `row` computes a missing row through `experiments.run_row`, and the Fisher look-ups
recompute an artifact that was deleted); the page modules protocols, anomalies and fisher_report
build on it. The notebooks of the book call these functions and only display what they return,
so every number of the book comes out of an executed notebook.

Paths:
  paper table   $FMPAPER_PAPER_DIR/paper_table.csv, else ../shared/paper/ beside the checkout
                (missing: the tables show our numbers only)
  written files $FMPAPER_RESULTS/<dataset>-<profile>/, else results/<dataset>-<profile>/ of the
                checkout (tables as CSV and Markdown, figures as PNG, executed row notebooks)
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import FmpaperError, __version__
from .config import PROFILES, make_config
from .evaluate import MODES, PROTOCOLS

MODE_NAMES = {"full": "FULL", "uni100": "RANDOM", "pop100": "POPULAR"}
METRICS = ("ndcg@10", "ndcg@20", "hr@10", "hr@20")
# paper_table.csv column of each (mode, metric) the paper reports
PAPER_COLUMNS = {
    ("full", "ndcg@10"): "full_ndcg10", ("full", "ndcg@20"): "full_ndcg20",
    ("uni100", "ndcg@10"): "random_ndcg10", ("uni100", "ndcg@20"): "random_ndcg20",
    ("pop100", "ndcg@10"): "popular_ndcg10", ("pop100", "ndcg@20"): "popular_ndcg20",
}



# ----------------------------------------------------------------------------- paths, parameters

def repo_root() -> Path | None:
    """The source checkout holding this package (None for an installed copy)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def paper_dir() -> Path:
    if os.environ.get("FMPAPER_PAPER_DIR"):
        return Path(os.environ["FMPAPER_PAPER_DIR"])
    return (repo_root() or Path.cwd()).parent / "shared" / "paper"


def results_root() -> Path:
    if os.environ.get("FMPAPER_RESULTS"):
        return Path(os.environ["FMPAPER_RESULTS"])
    return (repo_root() or Path.cwd()) / "results"


def dataset_name(dataset: str | None, profile: str) -> str:
    """The dataset a profile runs on (None: the profile's default), as named in run paths."""
    return Path(make_config(profile, dataset=dataset).dataset).stem


def results_dir(dataset: str | None, profile: str) -> Path:
    return results_root() / f"{dataset_name(dataset, profile)}-{profile}"


def _fail(what: str, value, expected: str, context: str = ""):
    where = f" ({context})" if context else ""
    raise FmpaperError(f"parameter {what}{where} must be {expected}, got {value!r} "
                       f"of type {type(value).__name__}")


def check_params(row=None, dataset=None, profile="smoke", seed=None, seeds=None, kind=None) -> dict:
    """Validate notebook parameters; FmpaperError naming the parameter (and the row) otherwise.
    Returns them normalised: dataset resolved from the profile, seeds as a list of ints."""
    from .experiments import get_row
    context = f"row {row!r}" if isinstance(row, str) else ""
    out = {}
    if not isinstance(profile, str):
        _fail("profile", profile, "a string", context)
    if profile not in PROFILES:
        raise FmpaperError(f"unknown profile {profile!r}{' for row ' + repr(row) if context else ''}; "
                           f"choose one of {', '.join(PROFILES)}")
    out["profile"] = profile
    if dataset is not None and not isinstance(dataset, str):
        _fail("dataset", dataset, "a string (ml-100k, ml-1m or a .inter path) or None", context)
    out["dataset"] = dataset_name(dataset or None, profile)
    if row is not None or kind is not None:
        if not isinstance(row, str):
            _fail("row", row, "a row name (a string; `fmpaper rows` lists them)")
        r = get_row(row)
        if kind is not None and r.kind not in kind:
            raise FmpaperError(f"row {row!r} is a {r.kind} row; this notebook runs {' or '.join(kind)} rows")
        out["row"] = r
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            _fail("seed", seed, "an integer >= 0", context)
        out["seed"] = int(seed)
    if seeds is not None:
        out["seeds"] = seed_list(seeds)
    return out


def seed_list(seeds) -> list[int]:
    """seeds = N (the seeds 0..N-1) or an explicit list of seeds."""
    if isinstance(seeds, bool):
        _fail("seeds", seeds, "a positive integer N (seeds 0..N-1) or a list of seeds")
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            _fail("seeds", seeds, "a positive integer N (seeds 0..N-1) or a list of seeds")
        return list(range(int(seeds)))
    if isinstance(seeds, (list, tuple)) and seeds and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds):
        return [int(s) for s in seeds]
    _fail("seeds", seeds, "a positive integer N (seeds 0..N-1) or a list of seeds")


# ----------------------------------------------------------------------------- display helpers

def _fmt_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _seeds_text(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


class Captioned:
    """A table with a caption line, shown as HTML in notebooks and the book."""

    def __init__(self, table: pd.DataFrame, caption: str, note: str = ""):
        self.table, self.caption, self.note = table, caption, note

    def _repr_html_(self) -> str:
        note = f"<p><small>{html.escape(self.note)}</small></p>" if self.note else ""
        return (f"<p><strong>{html.escape(self.caption)}</strong></p>"
                + self.table.to_html(na_rep="–", escape=True) + note)

    def __repr__(self) -> str:
        return f"{self.caption}\n{self.table.to_string(na_rep='-')}" + (f"\n{self.note}" if self.note else "")


@dataclass
class Provenance:
    """Where the numbers come from: dataset, profile, seeds, hardware and the runs' wall time."""
    dataset: str
    profile: str
    seeds: list
    hardware: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    n_runs: int = 0
    missing: list = field(default_factory=list)

    @property
    def short(self) -> str:
        hw = "; ".join(self.hardware) or "no runs"
        return f"{self.dataset} · profile {self.profile} · seeds {_seeds_text(self.seeds)} · {hw}"

    def text(self) -> str:
        parts = [f"dataset {self.dataset}", f"profile {self.profile}", f"seeds {_seeds_text(self.seeds)}",
                 f"{self.n_runs} finished runs on {'; '.join(self.hardware) or 'no hardware recorded'}"]
        if self.seconds:
            parts.append("run wall time " + ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in self.seconds.items()))
        out = " · ".join(parts)
        if self.missing:
            out += f" · NOT RUN YET: {', '.join(self.missing)}"
        return out

    def _repr_html_(self) -> str:
        return f"<p><em>Provenance: {html.escape(self.text())}</em></p>"

    def __repr__(self) -> str:
        return "Provenance: " + self.text()


class Clock:
    """Started at the top of a notebook; `stop()` shows when, how long and on what it ran."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.started = _dt.datetime.now(_dt.timezone.utc)

    def stop(self) -> "Stamp":
        return Stamp(self.started, time.perf_counter() - self.t0)


@dataclass
class Stamp:
    started: _dt.datetime
    seconds: float

    def text(self) -> str:
        from .train import hardware
        return (f"Notebook executed {self.started:%Y-%m-%d %H:%M:%S} UTC in {self.seconds:.1f} s "
                f"on {hardware()} (fmpaper {__version__}, torch {torch.__version__}, "
                f"Python {platform.python_version()})")

    def _repr_html_(self) -> str:
        return f"<p><small>{html.escape(self.text())}</small></p>"

    def __repr__(self) -> str:
        return self.text()


class Record:
    """A JSON-serialisable record of a notebook's result, for tests reading executed notebooks."""

    def __init__(self, obj: dict):
        self.obj = obj

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"application/json": self.obj, "text/plain": json.dumps(self.obj, sort_keys=True)}


# ----------------------------------------------------------------------------- one row

@dataclass
class RowReport:
    """One computed row: what it is, its test metrics and how long it took."""
    row: object            # experiments.Row
    dataset: str
    profile: str
    seed: int
    run: Path
    metrics: dict
    computed_now: bool     # False: the run was found finished in the cache
    seconds: float         # wall time of this call

    def label(self) -> str:
        r = self.row
        what = {"train": f"trained with objective {r.variant}",
                "ensemble": f"output ensemble of {', '.join(r.members)}"}.get(r.kind)
        if what is None:
            what = ("uniform merge" if r.method == "uniform" else
                    f"Fisher merge, estimator {r.estimator}" + (f", k = {r.k}" if r.k and r.estimator != "target" else "")
                    + (", batch-wise" if r.batchwise else "")) + f" of {', '.join(r.members)}"
            if r.finetune_epochs:
                what += f", fine-tuned {r.finetune_epochs} epochs"
        return f"{r.name} ({r.label}): {what}"

    def wall(self) -> dict:
        m = self.metrics
        out = {k: m[f"{k}_seconds"] for k in ("train", "fisher", "merge") if f"{k}_seconds" in m}
        return out

    def provenance(self) -> Provenance:
        return Provenance(self.dataset, self.profile, [self.seed], [self.metrics.get("hardware", "?")],
                          self.wall(), 1)

    def summary(self) -> pd.DataFrame:
        """Facts of the run: one column."""
        m = self.metrics
        facts = {"row": self.row.name, "label": self.row.label, "kind": self.row.kind,
                 "dataset": self.dataset, "profile": self.profile, "seed": self.seed,
                 "hardware": m.get("hardware", "?"),
                 "users / items": f"{m['data']['users']} / {m['data']['items']}" if "data" in m else "?",
                 "run directory": self.run.name}
        if self.row.kind == "train":
            facts.update({"epochs run": m.get("epochs_run"), "best epoch": m.get("best_epoch"),
                          "valid NDCG@10 (best)": f"{m.get('valid_ndcg@10', float('nan')):.4f}"})
        else:
            facts["members"] = ", ".join(self.row.members)
            if self.row.kind == "merge" and self.row.method == "fisher":
                facts["estimator"] = self.row.estimator
                facts["k"] = self.row.k if self.row.estimator not in ("exact", "target") else "–"
        for k, v in self.wall().items():
            facts[f"{k} wall time"] = _fmt_seconds(v)
        facts["this call"] = ("computed now" if self.computed_now else "read from the cache")
        return pd.DataFrame({"value": [str(v) for v in facts.values()]}, index=list(facts))

    def metrics_table(self) -> Captioned:
        rows = {}
        for protocol in PROTOCOLS:
            for mode in MODES:
                rows[(protocol, MODE_NAMES[mode])] = self.metrics["test"][protocol][mode]
        t = pd.DataFrame.from_dict(rows, orient="index")[list(METRICS)].round(4)
        t.index = pd.MultiIndex.from_tuples(t.index, names=["protocol", "mode"])
        return Captioned(t, f"Test metrics of {self.row.name} · {self.provenance().short}")

    def history(self) -> Captioned | None:
        path = self.run / "history.json"
        if not path.is_file():
            return None
        t = pd.DataFrame(json.loads(path.read_text())).set_index("epoch").round(4)
        return Captioned(t, f"Training history of {self.row.name} · {self.provenance().short}")

    def fisher_table(self) -> Captioned | None:
        metas = self.metrics.get("fisher")
        if not metas:
            return None
        t = pd.DataFrame([{"model": m.get("run", "?"), "estimator": m["estimator"], "k": m.get("k"),
                           "sequences": m.get("sequences"), "seconds": m["seconds"],
                           "hardware": m.get("hardware", "?")} for m in metas]).set_index("model")
        return Captioned(t, f"Fisher computation per merged model · {self.provenance().short}")

    def record(self) -> Record:
        return Record({"row": self.row.name, "dataset": self.dataset, "profile": self.profile,
                       "seed": self.seed, "run": _relative_run(self.run), "test": self.metrics["test"],
                       "hardware": self.metrics.get("hardware"), "wall": self.wall()})

    def _repr_html_(self) -> str:
        return (f"<p><strong>{html.escape(self.label())}</strong></p>"
                + self.provenance()._repr_html_())

    def __repr__(self) -> str:
        return f"{self.label()}\n{self.provenance()!r}"


def _relative_run(path: Path) -> str:
    from .experiments import runs_root
    try:
        return str(Path(path).relative_to(runs_root()))
    except ValueError:
        return str(path)


def row(name, dataset=None, profile="smoke", seed=0, kind=None) -> RowReport:
    """Compute row `name` (or read it from the cache) and report it. `kind`: allowed row kinds."""
    from .experiments import run_dir, run_row
    p = check_params(row=name, dataset=dataset, profile=profile, seed=seed,
                     kind=tuple(kind) if kind else None)
    dataset = dataset or None
    out = run_dir(name, dataset, profile, p["seed"])
    cached = (out / "metrics.json").is_file()
    t0 = time.perf_counter()
    metrics = run_row(name, dataset, profile, p["seed"], progress=False)
    return RowReport(p["row"], p["dataset"], profile, p["seed"], out, metrics, not cached,
                     time.perf_counter() - t0)


# ----------------------------------------------------------------------------- reading runs back

def _run_dirs(dataset, profile, seeds, rows=None):
    """{(row, seed): finished run dir}, [missing 'row (seed s)']."""
    from .experiments import run_dir
    from .experiments import rows as all_rows
    names = list(rows) if rows is not None else list(all_rows())
    found, missing = {}, []
    for s in seeds:
        for name in names:
            d = run_dir(name, dataset, profile, s)
            if (d / "metrics.json").is_file():
                found[(name, s)] = d
            else:
                missing.append(name if len(seeds) == 1 else f"{name} (seed {s})")
    return found, missing


def collect(dataset=None, profile="quick", seeds=1, rows=None) -> pd.DataFrame:
    """Every finished run's test metrics, long: row, label, kind, paper, k, seed, protocol, mode,
    metric, value, plus valid_ndcg10, train/fisher/merge/wall seconds, hardware and run.
    Rows not run yet are left out and listed in `df.attrs["missing"]`."""
    from .experiments import get_row
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    dataset = dataset or None
    seeds = p["seeds"]
    found, missing = _run_dirs(dataset, profile, seeds, rows)
    records = []
    for (name, s), d in found.items():
        m = json.loads((d / "metrics.json").read_text())
        r = get_row(name)
        secs = {k: float(m.get(f"{k}_seconds", 0.0)) for k in ("train", "fisher", "merge")}
        base = dict(row=name, label=r.label, kind=r.kind, paper=r.paper,
                    k=r.k if r.kind == "merge" and r.estimator not in (None, "exact") else None,
                    seed=s, valid_ndcg10=m.get("valid_ndcg@10"), train_seconds=secs["train"],
                    fisher_seconds=secs["fisher"], merge_seconds=secs["merge"],
                    wall_seconds=sum(secs.values()), hardware=m.get("hardware", "?"), run=d.name)
        for protocol, modes in m["test"].items():
            for mode, vals in modes.items():
                for metric, v in vals.items():
                    records.append(dict(base, protocol=protocol, mode=mode, metric=metric, value=float(v)))
    cols = ["row", "label", "kind", "paper", "k", "seed", "protocol", "mode", "metric", "value",
            "valid_ndcg10", "train_seconds", "fisher_seconds", "merge_seconds", "wall_seconds", "hardware", "run"]
    df = pd.DataFrame.from_records(records, columns=cols)
    df.attrs.update(dataset=p["dataset"], profile=profile, seeds=seeds, missing=missing)
    return df


def provenance(df: pd.DataFrame) -> Provenance:
    """Provenance of a `collect` frame: hardware and summed wall times of its runs."""
    runs = df.drop_duplicates(["row", "seed"])
    seconds = {}
    for k, name in (("train", "training"), ("fisher", "Fisher"), ("merge", "merging")):
        total = float(runs[f"{k}_seconds"].sum()) if len(runs) else 0.0
        if total > 0:
            seconds[name] = total
    return Provenance(df.attrs.get("dataset", "?"), df.attrs.get("profile", "?"), df.attrs.get("seeds", []),
                      sorted(runs["hardware"].unique().tolist()), seconds, len(runs), df.attrs.get("missing", []))


def load_paper_table() -> pd.DataFrame | None:
    """paper_table.csv indexed by row, or None when it is not there."""
    path = paper_dir() / "paper_table.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path).set_index("row")


def _row_order(names) -> list[str]:
    from .experiments import rows
    order = list(rows())
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def side_by_side(df: pd.DataFrame, protocol: str, paper: pd.DataFrame | None | str = "auto") -> pd.DataFrame:
    """Numeric table: index row; columns (quantity, stat) for each paper quantity (e.g. "FULL
    NDCG@10") with stat in paper, ours (mean over seeds), sd (over seeds), n (seeds), diff
    (ours - paper). paper="auto" reads paper_table.csv; None shows ours only."""
    if protocol not in PROTOCOLS:
        raise FmpaperError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if isinstance(paper, str):
        paper = load_paper_table()
    sub = df[df["protocol"] == protocol]
    agg = sub.groupby(["row", "mode", "metric"])["value"].agg(["mean", "std", "count"])
    names = set(sub["row"])
    if paper is not None:
        names |= set(paper.index)
    index = _row_order(names)
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


def _labels(names) -> list[str]:
    from .experiments import get_row
    out = []
    for n in names:
        try:
            r = get_row(n)
        except FmpaperError:
            out.append(n)
            continue
        k = f" ({r.k})" if r.kind == "merge" and r.k and r.estimator not in ("exact", "target") else ""
        out.append(r.label + k + ("" if r.paper else " †"))
    return out


def format_side_by_side(t: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Strings for display: per quantity the paper's value, ours as mean ± sd, and the difference."""
    def num(x, signed=False):
        if x is None or not np.isfinite(x):
            return "–"
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    cols = {}
    for q in t.columns.get_level_values(0).unique():
        cols[(q, "paper")] = [num(v) for v in t[(q, "paper")]]
        cols[(q, "ours")] = [num(m) + (f" ± {s:.{digits}f}" if np.isfinite(s) else "")
                             if np.isfinite(m) else "not run"
                             for m, s in zip(t[(q, "ours")], t[(q, "sd")])]
        cols[(q, "Δ")] = [num(v, True) for v in t[(q, "diff")]]
    out = pd.DataFrame(cols, index=pd.Index(_labels(t.index), name="row"))
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    return out


def show_table(df: pd.DataFrame, protocol: str, paper="auto") -> Captioned:
    """The side-by-side table of one protocol, captioned with its provenance."""
    if isinstance(paper, str):
        paper = load_paper_table()
    t = format_side_by_side(side_by_side(df, protocol, paper))
    seeds = df.attrs.get("seeds", [])
    src = ("paper: the published table (ML-1M)" if paper is not None
           else f"paper_table.csv not found under {paper_dir()}: ours only")
    note = (f"{src}; ours: mean ± sd over {len(seeds)} seed(s); Δ = ours − paper; "
            f"† marks reference rows the paper does not have.")
    return Captioned(t, f"NDCG under the {protocol} protocol · {provenance(df).short}", note)


# ----------------------------------------------------------------------------- paired comparisons

def _ranks(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "ranks.safetensors"))


def _per_user_ndcg(run: Path, key: str, k: int) -> np.ndarray:
    from .evaluate import ndcg
    return ndcg(_ranks(run)[key], k).numpy()


def wilcoxon_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value (zero differences dropped); 1.0 if all are zero."""
    from scipy.stats import wilcoxon
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


def paired_tests(dataset=None, profile="quick", seeds=1, rows=None, k: int = 10,
                 n_boot: int = 2000, level: float = 0.95) -> pd.DataFrame:
    """Per-user NDCG@k of each combined row (merges, ensemble) against (a) the best single model
    (the trained row with the highest validation NDCG@10, chosen per seed) and (b) the uniform
    merge, under every protocol and mode. A user's difference is averaged over seeds; the table
    gives its mean, a paired bootstrap CI (users resampled) and the Wilcoxon signed-rank p-value."""
    from .experiments import rows as all_rows
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    dataset, seeds = dataset or None, p["seeds"]
    found, _ = _run_dirs(dataset, profile, seeds)
    combined = [n for n, r in all_rows().items() if r.kind != "train"] if rows is None else list(rows)
    trained = [n for n, r in all_rows().items() if r.kind == "train" and r.paper]  # the paper's five
    keys = [f"{pr}.{m}" for pr in PROTOCOLS for m in MODES]
    best = {}
    for s in seeds:
        cands = [(json.loads((found[(n, s)] / "metrics.json").read_text()).get("valid_ndcg@10", -1), n)
                 for n in trained if (n, s) in found]
        if cands:
            best[s] = max(cands)[1]
    refs = {"best single model": lambda s: best.get(s), "uniform merge": lambda s: "uniform"}
    cache = {}

    def user_ndcg(run, key):
        if (run, key) not in cache:
            cache[(run, key)] = _per_user_ndcg(run, key, k)
        return cache[(run, key)]
    comparisons, diffs = [], []
    for name in combined:
        for ref_name, ref_of in refs.items():
            if name == "uniform" and ref_name == "uniform merge":
                continue
            pairs = [(found.get((name, s)), found.get((ref_of(s), s)), ref_of(s)) for s in seeds]
            pairs = [(a, b, r) for a, b, r in pairs if a is not None and b is not None]
            if not pairs:
                continue
            for key in keys:
                d = np.mean([user_ndcg(a, key) - user_ndcg(b, key) for a, b, _ in pairs], 0)
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
    out.attrs.update(dataset=p["dataset"], profile=profile, seeds=seeds, k=k, n_boot=n_boot, level=level)
    return out


def show_paired(paired: pd.DataFrame, reference: str, prov: Provenance | None = None) -> Captioned:
    """One reference's comparisons as 'mean diff [CI] p' strings: rows x protocol/mode."""
    sub = paired[paired["reference"] == reference]
    k, level = paired.attrs.get("k", 10), paired.attrs.get("level", 0.95)
    cells = {}
    for _, r in sub.iterrows():
        col = "FULL (both protocols)" if r["mode"] == "full" else f"{r['protocol']} {MODE_NAMES[r['mode']]}"
        if r["mode"] == "full" and r["protocol"] == "corrected":
            continue  # FULL ranks every item: the same under both protocols
        cells.setdefault(r["row"], {})[col] = (f"{r['mean_diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
                                               f"p={r['p_wilcoxon']:.2g}")
    order = _row_order(cells)
    t = pd.DataFrame([cells[n] for n in order], index=pd.Index(_labels(order), name="row"))
    refs = ", ".join(sorted(set(", ".join(sub["reference_rows"]).split(", ")))) if len(sub) else "none"
    who = prov.short if prov is not None else (
        f"{paired.attrs.get('dataset')} · profile {paired.attrs.get('profile')} · "
        f"seeds {_seeds_text(paired.attrs.get('seeds', []))}")
    note = (f"Per-user NDCG@{k} of the row minus that of the {reference} ({refs}); mean over users "
            f"[{level:.0%} paired bootstrap CI, {paired.attrs.get('n_boot')} resamples] and two-sided "
            f"Wilcoxon signed-rank p (no correction for multiple comparisons).")
    return Captioned(t, f"Paired comparison against the {reference} · {who}", note)


def verdict(paired: pd.DataFrame) -> Captioned:
    """Which combined rows beat each reference, which lose to it and which are not resolved (the
    bootstrap CI of the mean per-user difference above 0, below 0, or across 0), in FULL and in
    the corrected sampled modes."""
    a = paired.attrs
    recs = {}
    for ref in ("best single model", "uniform merge"):
        sub = paired[(paired["reference"] == ref) & ((paired["mode"] == "full") & (paired["protocol"] == "paper")
                                                    | (paired["protocol"] == "corrected") & (paired["mode"] != "full"))]
        for mode, g in sub.groupby("mode", sort=False):
            up, down = g["ci_low"] > 0, g["ci_high"] < 0
            recs[(ref, MODE_NAMES[mode] + ("" if mode == "full" else " (corrected)"))] = {
                what: ", ".join(g.loc[mask, "row"]) or "none"
                for what, mask in (("better", up), ("worse", down), ("not resolved", ~up & ~down))}
    t = pd.DataFrame(recs).T if recs else pd.DataFrame(columns=["better", "worse", "not resolved"])
    note = (f"Per-user NDCG@{a.get('k', 10)}, {a.get('level', 0.95):.0%} paired bootstrap intervals of the mean "
            f"difference; {a.get('dataset')}, profile {a.get('profile')}, seeds {_seeds_text(a.get('seeds', []))}.")
    return Captioned(t, "Which differences survive", note)


# ----------------------------------------------------------------------------- shared by the page modules

def _data_for(dataset, profile, seed=0):
    from .train import load_data
    return load_data(make_config(profile, dataset=dataset, seed=seed))


class Text:
    """A generated paragraph (its numbers come from the runs), shown as HTML."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"

    def __repr__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------- data

def data_summary(dataset=None, profile="quick") -> pd.DataFrame:
    """Users, items, interactions, training examples and sequence lengths: the whole dataset
    after the 5-core filter, and the profile's subset when it keeps fewer users."""
    from .data import load
    p = check_params(dataset=dataset, profile=profile)
    cfg = make_config(profile, dataset=dataset or None)
    sets = {f"{p['dataset']} after {cfg.min_count}-core": load(cfg.dataset, cfg.max_len, cfg.min_count, 0)}
    if cfg.max_users:
        sets[f"profile {profile} (first {cfg.max_users} users)"] = load(cfg.dataset, cfg.max_len, cfg.min_count,
                                                                         cfg.max_users)
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
    from .data import load
    check_params(dataset=dataset, profile=profile)
    cfg = make_config(profile, dataset=dataset or None)
    sets = {"all users": load(cfg.dataset, cfg.max_len, cfg.min_count, 0)}
    if cfg.max_users:
        sets[f"profile {profile}"] = load(cfg.dataset, cfg.max_len, cfg.min_count, cfg.max_users)
    frames = [pd.DataFrame({"set": name, "user": np.arange(d.n_users), "length": d.offsets.diff().numpy()})
              for name, d in sets.items()]
    out = pd.concat(frames, ignore_index=True)
    counts = sets["all users"].item_counts()[1:].numpy()
    out.attrs.update(max_len=cfg.max_len, item_counts=np.sort(counts)[::-1].copy(),
                     dataset=Path(cfg.dataset).stem, profile=profile)
    return out


# ----------------------------------------------------------------------------- written results

def to_markdown(t: pd.DataFrame) -> str:
    """A pipe table (no dependency on tabulate); MultiIndex columns are joined with spaces."""
    cols = [" ".join(str(c) for c in (col if isinstance(col, tuple) else (col,))).strip() for col in t.columns]
    idx_name = " / ".join(n for n in (t.index.names or []) if n) or ""
    def cell(v):
        if isinstance(v, float):
            return "–" if not np.isfinite(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|")
    idx = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in t.index]
    lines = ["| " + " | ".join([idx_name] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for i, (_, r) in zip(idx, t.iterrows()):
        lines.append("| " + " | ".join([cell(i)] + [cell(v) for v in r.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def write_tables(dataset=None, profile="quick", seeds=1, runs: pd.DataFrame | None = None,
                 paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write the long run table, the side-by-side tables (both protocols), the paired tests (CSV
    and Markdown) and the seconds of every Fisher computation (CSV) under results/<dataset>-<profile>/. Returns a table of the files written."""
    runs = collect(dataset, profile, seeds) if runs is None else runs
    paired = paired_tests(dataset, profile, seeds) if paired is None else paired
    out = results_dir(dataset or None, profile)
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(runs)
    header = f"<!-- written by fmpaper.results.write_tables; {prov.text()} -->\n\n"
    written = []

    def put(name, text):
        (out / name).write_text(text)
        written.append(name)
    put("runs.csv", runs.to_csv(index=False))
    for protocol in PROTOCOLS:
        t = side_by_side(runs, protocol)
        flat = t.copy()
        flat.columns = [f"{q} {s}" for q, s in t.columns]
        flat.insert(0, "label", _labels(t.index))
        put(f"table_{protocol}.csv", flat.to_csv())
        shown = show_table(runs, protocol)
        put(f"table_{protocol}.md", header + f"**{shown.caption}**\n\n" + to_markdown(shown.table)
            + f"\n{shown.note}\n")
    put("paired.csv", paired.to_csv(index=False))
    md = header
    for ref in ("best single model", "uniform merge"):
        shown = show_paired(paired, ref, prov)
        md += f"**{shown.caption}**\n\n" + to_markdown(shown.table) + f"\n{shown.note}\n\n"
    put("paired.md", md)
    from .fisher_report import fisher_costs
    put("fisher_costs.csv", fisher_costs(dataset, profile, seeds).to_csv(index=False))  # per model
    return pd.DataFrame({"file": written}, index=pd.Index([f"results/{out.name}"] * len(written), name="folder"))


def _mean_over_seeds(df: pd.DataFrame, protocol: str, mode: str, metric: str) -> pd.DataFrame:
    """Per row of a `collect` frame (or a runs.csv read back): mean, sd and count over seeds of one value."""
    sub = df[(df["protocol"] == protocol) & (df["mode"] == mode) & (df["metric"] == metric)]
    return sub.groupby("row")["value"].agg(["mean", "std", "count"])


def profile_comparison(dataset=None, profiles=("quick", "paper"), protocol: str = "paper",
                       mode: str = "full", metric: str = "ndcg@10") -> Captioned:
    """One metric of every row under each training profile, read back from the runs.csv that
    write_tables left in results/<dataset>-<profile>/ (mean ± sd over that profile's seeds), with
    each row's rank within its profile; the difference and Kendall's tau between the orders are
    those of the first two profiles found."""
    from scipy.stats import kendalltau
    dataset = dataset or make_config(profiles[0]).dataset  # one dataset for every profile
    cols, means, found = {}, {}, []
    for prof in profiles:
        path = results_dir(dataset, prof) / "runs.csv"
        if not path.is_file():
            continue
        df = pd.read_csv(path)
        agg = _mean_over_seeds(df, protocol, mode, metric)
        seeds = sorted(df["seed"].unique().tolist())
        name = f"{prof} ({'seed' if len(seeds) == 1 else 'seeds'} {_seeds_text(seeds)})"
        means[prof] = agg["mean"]
        cols[(name, "mean")] = agg["mean"]
        cols[(name, "sd")] = agg["std"]
        cols[(name, "rank")] = agg["mean"].rank(ascending=False, method="min")
        found.append(prof)
    if len(found) < 2:
        return Captioned(pd.DataFrame(), "Rows under several training profiles",
                         f"needs runs.csv of at least two of the profiles {', '.join(profiles)} under "
                         f"{results_dir(dataset, profiles[0]).parent}; found {', '.join(found) or 'none'}.")
    t = pd.DataFrame(cols)
    t = t.loc[_row_order(t.index)]
    a, b = means[found[0]].reindex(t.index), means[found[1]].reindex(t.index)
    t[(f"{found[1]} − {found[0]}", "")] = b - a
    ok = a.notna() & b.notna()
    tau = kendalltau(a[ok], b[ok]).statistic if ok.sum() >= 3 else float("nan")
    t.index = pd.Index(_labels(t.index), name="row")
    t.columns = pd.MultiIndex.from_tuples(t.columns)
    label = f"{MODE_NAMES[mode]} {metric.upper()}"
    note = (f"{protocol} protocol; rank 1 = best row of that profile; Kendall's tau between the two "
            f"profiles' orders of the {int(ok.sum())} rows both have: {tau:+.2f}. sd is over seeds "
            f"(empty for one seed).")
    return Captioned(t.round(4), f"{label} of every row under each training profile", note)


# ----------------------------------------------------------------------------- a book page

class Page:
    """What a book notebook needs first: its checked parameters, the finished runs (`runs`), their
    provenance, a clock, and the folder its figures are saved to."""

    def __init__(self, dataset=None, profile="quick", seeds=1):
        self.clock = Clock()
        p = check_params(dataset=dataset, profile=profile, seeds=seeds)
        self.dataset, self.profile, self.seeds = dataset or None, profile, p["seeds"]
        self.runs = collect(self.dataset, profile, self.seeds)
        self.provenance = provenance(self.runs)
        self.folder = results_dir(self.dataset, profile) / "figures"

    @property
    def caption(self) -> str:
        return self.provenance.short

    def table(self, t: pd.DataFrame, title: str, note: str = "") -> Captioned:
        return Captioned(t, f"{title} · {self.caption}", note)

    def publish(self, fig, name: str):
        from .figures import publish
        return publish(fig, name, self.folder)

    def done(self) -> Stamp:
        return self.clock.stop()


def page(dataset=None, profile="quick", seeds=1) -> Page:
    return Page(dataset, profile, seeds)


def machine_caption(dataset=None, profile="quick") -> str:
    """dataset · profile · this machine: the caption of figures made from data, not runs."""
    from .train import hardware
    return f"{dataset_name(dataset or None, profile)} · profile {profile} · {hardware()}"
