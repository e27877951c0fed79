"""What every page shows besides its results: checked parameters, captioned tables, provenance,
the execution stamp, generated paragraphs, Markdown output and the figure primitives. Every
book notebook starts from a `Page`.
"""
from __future__ import annotations

import datetime
import html
import io
import json
import math
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Image
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

from .. import FmpaperError, __version__
from ..config import PROFILES
from ..rows import get_row, in_family
from ..runs import PAPER_DATASET, collect, dataset_name, results_dir
from ..train import hardware

MODE_NAMES = {"full": "FULL", "uni100": "RANDOM", "pop100": "POPULAR"}


METRICS = ("ndcg@10", "ndcg@20", "hr@10", "hr@20")


def fail(what: str, value, expected: str, context: str = ""):
    where = f" ({context})" if context else ""
    raise FmpaperError(f"parameter {what}{where} must be {expected}, got {value!r} "
                       f"of type {type(value).__name__}")


def check_params(row=None, dataset=None, profile="smoke", seed=None, seeds=None, kind=None) -> dict:
    """Validate notebook parameters; FmpaperError naming the parameter (and the row) otherwise.
    Returns them normalised: dataset resolved from the profile, seeds as a list of ints."""
    context = f"row {row!r}" if isinstance(row, str) else ""
    out = {}
    if not isinstance(profile, str):
        fail("profile", profile, "a string", context)
    if profile not in PROFILES:
        raise FmpaperError(f"unknown profile {profile!r}{' for row ' + repr(row) if context else ''}; "
                           f"choose one of {', '.join(PROFILES)}")
    out["profile"] = profile
    if dataset is not None and not isinstance(dataset, str):
        fail("dataset", dataset, "a string (ml-100k, ml-1m or a .inter path) or None", context)
    out["dataset"] = dataset_name(dataset or None, profile)
    if row is not None or kind is not None:
        if not isinstance(row, str):
            fail("row", row, "a row name (a string; `fmpaper rows` lists them)")
        r = get_row(row)
        if kind is not None and r.kind not in kind:
            raise FmpaperError(f"row {row!r} is a {r.kind} row; this notebook runs {' or '.join(kind)} rows")
        out["row"] = r
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            fail("seed", seed, "an integer >= 0", context)
        out["seed"] = int(seed)
    if seeds is not None:
        out["seeds"] = seed_list(seeds)
    return out


def seed_list(seeds) -> list[int]:
    """seeds = N (the seeds 0..N-1) or an explicit list of seeds."""
    if isinstance(seeds, bool):
        fail("seeds", seeds, "a positive integer N (seeds 0..N-1) or a list of seeds")
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            fail("seeds", seeds, "a positive integer N (seeds 0..N-1) or a list of seeds")
        return list(range(int(seeds)))
    if isinstance(seeds, (list, tuple)) and seeds and all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds):
        return [int(s) for s in seeds]
    fail("seeds", seeds, "a positive integer N (seeds 0..N-1) or a list of seeds")


def fmt_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def mean_sd(mean: float, sd: float, digits: int = 4) -> str:
    """A cell of "mean±sd over seeds": no ± part when there is no sd (one seed), "not run" when
    there is no mean."""
    if mean is None or not np.isfinite(mean):
        return "not run"
    return f"{mean:.{digits}f}" + (f"±{sd:.{digits}f}" if sd is not None and np.isfinite(sd) else "")


def published_label(dataset: str | None) -> str:
    """How a table names the paper's column: "published", or "published (ML-1M)" beside runs of
    another dataset (not "paper": that is also the name of a protocol)."""
    return "published" if dataset == PAPER_DATASET else "published (ML-1M)"


def seeds_text(seeds) -> str:
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def seed_marks(df: pd.DataFrame, names) -> list[str]:
    """Per row of `names` in a long frame with "row" and "seed" columns (its attrs name the set's
    seeds): " (seed 0)" and the like where the row is finished for only some of the set's seeds
    so far (its numbers average those), "" where it has every seed or none."""
    seeds = df.attrs.get("seeds", [])
    have = df.groupby("row")["seed"].unique()
    return [f" (seed{'s' if len(have[n]) > 1 else ''} {seeds_text(sorted(int(s) for s in have[n]))})"
            if n in have.index and len(have[n]) < len(seeds) else "" for n in names]


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


class Tables:
    """Several captioned tables shown one after the other (a notebook cell shows one object)."""

    def __init__(self, items: list[Captioned]):
        self.items = list(items)

    def _repr_html_(self) -> str:
        return "".join(t._repr_html_() for t in self.items)

    def __repr__(self) -> str:
        return "\n\n".join(repr(t) for t in self.items)


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
        return f"{self.dataset} · profile {self.profile} · seeds {seeds_text(self.seeds)} · {hw}"

    def text(self) -> str:
        parts = [f"dataset {self.dataset}", f"profile {self.profile}", f"seeds {seeds_text(self.seeds)}",
                 f"{self.n_runs} finished runs on {'; '.join(self.hardware) or 'no hardware recorded'}"]
        if self.seconds:
            parts.append("run wall time " + ", ".join(f"{k} {fmt_seconds(v)}" for k, v in self.seconds.items()))
        out = " · ".join(parts)
        if self.missing:
            out += f" · NOT RUN YET: {', '.join(self.missing)}"
        return out

    def _repr_html_(self) -> str:
        return f"<p><em>Provenance: {html.escape(self.text())}</em></p>"

    def __repr__(self) -> str:
        return "Provenance: " + self.text()


def runs_table(dataset=None, profile="quick", seeds=1, names=None, family: str | None = "scratch") -> pd.DataFrame:
    """runs.collect with checked parameters: the test metrics of every finished run of `names`
    (default: the rows of `family` that run in the profile; family None: every row), long."""
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    names = in_family(family, profile) if names is None else names
    return collect(dataset or None, profile, p["seeds"], names)


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


class Clock:
    """Started at the top of a notebook; `stop()` shows when, how long and on what it ran."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.started = datetime.datetime.now(datetime.timezone.utc)

    def stop(self) -> "Stamp":
        return Stamp(self.started, time.perf_counter() - self.t0)


@dataclass
class Stamp:
    started: datetime.datetime
    seconds: float

    def text(self) -> str:
        return (f"Notebook executed {self.started:%Y-%m-%d %H:%M:%S} UTC in {self.seconds:.1f} s "
                f"on {hardware()} (fmpaper {__version__}, torch {torch.__version__}, "
                f"Python {platform.python_version()})")

    def _repr_html_(self) -> str:
        return f"<p><small>{html.escape(self.text())}</small></p>"

    def __repr__(self) -> str:
        return self.text()


# the part of `Stamp.text()` that differs between two executions of the same notebook, on one
# machine or two: when, how long, and on which processor and threads (the versions stay)
STAMP_EXECUTION = re.compile(r"Notebook executed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC in \d+\.\d s on .*? \(fmpaper ")


class Record:
    """A JSON-serialisable record of a notebook's result, for tests reading executed notebooks."""

    def __init__(self, obj: dict):
        self.obj = obj

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"application/json": self.obj, "text/plain": json.dumps(self.obj, sort_keys=True)}


class Text:
    """A generated paragraph (its numbers come from the runs), shown as HTML."""

    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"

    def __repr__(self) -> str:
        return self.text


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


class Page:
    """What a book notebook needs first: its checked parameters, the finished runs (`runs`), their
    provenance, a clock, and the folder its figures are saved to."""

    def __init__(self, dataset=None, profile="quick", seeds=1, family: str | None = "scratch"):
        self.clock = Clock()
        p = check_params(dataset=dataset, profile=profile, seeds=seeds)
        self.dataset, self.profile, self.seeds = dataset or None, profile, p["seeds"]
        self.runs = runs_table(self.dataset, profile, self.seeds, family=family)   # family None: every row
        self.provenance = provenance(self.runs)
        self.folder = results_dir(self.dataset, profile) / "figures"

    @property
    def caption(self) -> str:
        return self.provenance.short

    def table(self, t: pd.DataFrame, title: str, note: str = "") -> Captioned:
        return Captioned(t, f"{title} · {self.caption}", note)

    def publish(self, fig, name: str):
        return publish(fig, name, self.folder)

    def done(self) -> Stamp:
        return self.clock.stop()


DPI = 110


PALETTE = sns.color_palette("colorblind")


ESTIMATOR_COLORS = {"exact": PALETTE[7], "target": PALETTE[3], "random": PALETTE[0], "topk": PALETTE[1],
                    "model": PALETTE[2]}


ESTIMATOR_MARKERS = {"exact": "*", "target": "D", "random": "o", "topk": "s", "model": "^"}


def figure(w: float, h: float, caption: str | None) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    if caption:
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="0.35")
    return fig


def style(ax) -> None:
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def log_ticks(ax, lo, hi) -> None:
    """Log x axis with plain 1-2-5 tick labels."""
    ax.set_xscale("log")
    ticks = [m * 10 ** e for e in range(-3, 7) for m in (1, 2, 5) if lo / 1.5 <= m * 10 ** e <= hi * 1.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def publish(fig: Figure, name: str, folder: str | Path):
    """Save `fig` as folder/name.png and return it as an image for the notebook to display."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    png = buf.getvalue()
    (folder / f"{name}.png").write_bytes(png)
    return Image(data=png, format="png")
