"""The rows of the paper's table, declared in rows.toml, and how each Fisher is specified.

`Row` is one row (a trained model, a merge of trained rows, or an output ensemble); `FisherSpec`
is one Fisher estimate (estimator, k, batch-wise, the authors' form), used alike by the merge
rows, the Fisher cache and `fmpaper fisher`. Which estimators take k (and batch-wise, and the
authors' form) is decided in one place, `fmpaper.fisher.check_options`, which both `FisherSpec`
and `compute_fisher` call.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import FmpaperError
from .fisher import check_options

ROWS_FILE = Path(__file__).with_name("rows.toml")

ESTIMATOR_NAMES = {"exact": "exact", "target": "target item", "random": "random sampling",
                   "topk": "top-k sampling", "model": "model-based sampling", "bruteforce": "brute force"}


@dataclass(frozen=True)
class FisherSpec:
    """One diagonal-Fisher estimate of a model over its validation inputs (fmpaper.fisher)."""
    estimator: str                     # one of fisher.ESTIMATORS
    k: int | None = None               # items drawn per sequence: only for fisher.TAKES_K
    batchwise: bool = False            # square the gradient of a batch sum over the j-th draws (sampled estimators)
    authors: bool = False              # the authors' target-item form (logits / 10)

    def __post_init__(self):
        check_options(self.estimator, self.k, self.batchwise, self.authors)

    @property
    def items_per_sequence(self) -> int | None:
        """Items whose gradient enters per sequence: k, 1 for the target item, None for all items."""
        return 1 if self.estimator == "target" else self.k

    def describe(self) -> str:
        return (ESTIMATOR_NAMES[self.estimator] + (f", k = {self.k}" if self.k else "")
                + (", batch-wise" if self.batchwise else "") + (", authors' form" if self.authors else ""))


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    kind: str                          # "train", "merge" or "ensemble"
    variant: str | None = None         # train rows: the objective
    method: str = "fisher"             # merge rows: "fisher" or "uniform"
    estimator: str | None = None       # fisher merges: one of fisher.ESTIMATORS
    k: int | None = None               # items per sequence for the estimators in fisher.TAKES_K
    batchwise: bool = False            # the batch-sum Fisher approximation (see FisherSpec)
    members: tuple = ()                # merge/ensemble rows: names of the train rows combined
    finetune_epochs: int = 0           # CE epochs after merging (the authors used 10); on a train row
                                       #   with init_from: that run trained the same way (a control)
    finetune_lr: float | None = None   # their learning rate (None: the first member's)
    seed_shift: tuple = ()             # merge rows: member i is trained with seed + seed_shift[i]
    paper: bool = True                 # False: a reference row the paper does not have
    settings: tuple = ()               # train rows: Config overrides, ((field, value), ...)
    family: str = "scratch"            # "scratch": models trained from a fresh initialisation;
                                       #   "finetuned": copies fine-tuned from one SASRec ([finetuned])
    counterpart: str | None = None     # finetuned rows: the from-scratch row of the same recipe
    profiles: tuple = ()               # the profiles the row runs in (empty: every profile)

    @property
    def fisher(self) -> FisherSpec | None:
        """The Fisher of each member (Fisher merges only)."""
        if self.kind != "merge" or self.method != "fisher":
            return None
        return FisherSpec(self.estimator, self.k, self.batchwise)

    @property
    def init_from(self) -> str | None:
        """The row a train row starts from (its `init_from` setting), if any."""
        return dict(self.settings).get("init_from") or None

    def needs(self, seed: int) -> list[tuple[str, int]]:
        """(row, seed) of every run this row is computed from: a merge's members (with their seed
        shifts), a fine-tuned row's starting point."""
        if self.kind == "train":
            return [(self.init_from, seed)] if self.init_from else []
        shifts = self.seed_shift or (0,) * len(self.members)
        return [(m, seed + d) for m, d in zip(self.members, shifts)]

    def runs_in(self, profile: str) -> bool:
        return not self.profiles or profile in self.profiles

    @property
    def short_label(self) -> str:
        """The label as the tables show it: with k, and a † for reference rows."""
        k = f" ({self.k})" if self.kind == "merge" and self.k else ""
        return self.label + k + ("" if self.paper else " †")

    def describe(self) -> str:
        """What the row computes, in one line."""
        if self.kind == "train" and self.finetune_epochs:
            lr = f" at lr {self.finetune_lr:g}" if self.finetune_lr else ""
            what = (f"{self.init_from} trained {self.finetune_epochs} more epochs (at most the profile's) with "
                    f"CE{lr}, last epoch kept, as the merges trained further are")
        elif self.kind == "train":
            what = f"trained with objective {self.variant}"
            if self.settings:
                what += " (" + ", ".join(f"{k} = {v}" for k, v in self.settings) + ")"
        elif self.kind == "ensemble":
            what = f"output ensemble of {', '.join(self.members)}"
        else:
            what = ("uniform merge" if self.method == "uniform" else f"Fisher merge ({self.fisher.describe()})")
            what += f" of {', '.join(self.members)}"
            if self.seed_shift:
                what += " (trained with seeds " + ", ".join(f"s+{d}" for d in self.seed_shift) + ")"
            if self.finetune_epochs:
                lr = f" at lr {self.finetune_lr:g}" if self.finetune_lr else ""
                what += (f", then trained {self.finetune_epochs} epochs (at most the profile's) with CE{lr}, "
                         "last epoch kept")
        return what


def _row(r: dict) -> Row:
    row = Row(**{**r, "members": tuple(r.get("members", ())), "seed_shift": tuple(r.get("seed_shift", ())),
                 "profiles": tuple(r.get("profiles", ())),
                 "settings": tuple(sorted(r.get("settings", {}).items()))})
    row.fisher  # validates estimator and k
    if row.seed_shift and len(row.seed_shift) != len(row.members):
        raise FmpaperError(f"row {row.name}: seed_shift needs one shift per member")
    return row


def _finetuned(spec: dict, scratch: dict[str, Row]) -> list[Row]:
    """The [finetuned] family: ft_<variant> for each objective, fine-tuned from the base row;
    <member>_tuned for each merged member, trained further like the merges; ft_<row> for each
    listed merge or ensemble, over the fine-tuned members; ft_<row>_tuned for each listed merge,
    trained further with CE after merging."""
    out = []
    for v in spec["variants"]:
        src = next(r for r in scratch.values() if r.kind == "train" and r.variant == v and not r.settings)
        out.append(_row(dict(name=f"ft_{v}", label=f"FT: {src.label}", kind="train", variant=v, paper=False,
                             family="finetuned", counterpart=src.name,
                             settings={"init_from": spec["base"], "lr": spec["lr"]})))
    labels_ = {r.name: r.label for r in out}
    for m in spec["members"]:
        out.append(_row(dict(name=f"{m}_tuned", label=labels_[m].replace("FT: ", "FT+CE: ", 1), kind="train",
                             variant="sasrec", paper=False, family="finetuned", settings={"init_from": m},
                             finetune_epochs=spec["tuned_epochs"], finetune_lr=spec["tuned_lr"])))
    for name in spec["merges"]:
        src = scratch[name]
        common = {k: v for k, v in src.__dict__.items() if k not in ("name", "label", "members", "paper")}
        common.update(members=tuple(spec["members"]), paper=False, family="finetuned", counterpart=name)
        out.append(Row(**{**common, "name": f"ft_{name}", "label": f"FT: {src.label}"}))
        if src.kind == "merge":
            out.append(Row(**{**common, "name": f"ft_{name}_tuned", "label": f"FT+CE: {src.label}",
                              "finetune_epochs": spec["tuned_epochs"], "finetune_lr": spec["tuned_lr"]}))
    return out


@lru_cache(maxsize=1)
def rows() -> dict[str, Row]:
    """Every row by name: rows.toml's [[row]] entries in the file's order (the tables' order),
    then the [finetuned] family generated from them."""
    spec = tomllib.loads(ROWS_FILE.read_text())
    defaults = spec["merge"]
    out = {}
    for r in spec["row"]:
        if r["kind"] != "train":
            r.setdefault("members", defaults["members"])
            r.setdefault("finetune_epochs", defaults["finetune_epochs"])
        row = _row(r)
        out[row.name] = row
    for row in _finetuned(spec["finetuned"], dict(out)):
        out[row.name] = row
    for row in out.values():
        for dep, _ in row.needs(0):
            if dep not in out or out[dep].kind != "train":
                raise FmpaperError(f"row {row.name} is computed from {dep!r}, which is not a trained row")
    return out


def get_row(name: str) -> Row:
    if name not in rows():
        raise FmpaperError(f"unknown row {name!r}; rows are: {', '.join(rows())}")
    return rows()[name]


def row_order(names) -> list[str]:
    """`names` in the order of rows.toml (unknown names last, alphabetically)."""
    order = list(rows())
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def labels(names) -> list[str]:
    """Each row's short label (an unknown name stays as it is)."""
    return [rows()[n].short_label if n in rows() else n for n in names]


def with_needs(pairs, expand=lambda row: True) -> list[tuple[str, int]]:
    """The (row, seed) pairs and, transitively, every run they are computed from (`Row.needs`:
    members, members of other seeds, the run a fine-tuned row starts from), each once, in the
    order found; `expand(row)` says whether a row's own needs are followed."""
    out, seen, todo = [], set(), list(pairs)
    while todo:
        name, seed = todo.pop(0)
        if (name, seed) in seen:
            continue
        seen.add((name, seed))
        out.append((name, seed))
        if expand(get_row(name)):
            todo += get_row(name).needs(seed)
    return out


def in_family(family: str | None, profile: str | None = None) -> list[str]:
    """Rows of one family ("scratch", "finetuned"; None: every row) that run in `profile`."""
    return [n for n, r in rows().items()
            if (family is None or r.family == family) and (profile is None or r.runs_in(profile))]


def trained(paper_only: bool = False, family: str | None = "scratch") -> list[str]:
    return [n for n in in_family(family) if rows()[n].kind == "train" and (rows()[n].paper or not paper_only)]


def combined(family: str | None = "scratch", profile: str | None = None) -> list[str]:
    """The merge and ensemble rows (of those that run in `profile`, when given)."""
    return [n for n in in_family(family, profile) if rows()[n].kind != "train"]


def fisher_merges(family: str | None = "scratch") -> list[str]:
    return [n for n in in_family(family) if rows()[n].fisher is not None]


def one_seed_of(name: str) -> str | None:
    """For a merge whose members come from different seeds: the same merge (method, Fisher,
    members) of the members of one seed, its counterpart; None for every other row."""
    r = get_row(name)
    if not r.seed_shift:
        return None
    return next((n for n, o in rows().items() if o.kind == r.kind and o.method == r.method and o.fisher == r.fisher
                 and o.members == r.members and not o.seed_shift and not o.finetune_epochs), None)


def uniform_of(name: str) -> str | None:
    """The uniform merge of the same members as combined row `name`, trained further alike (its
    natural reference)."""
    r = get_row(name)
    return next((n for n, o in rows().items() if o.method == "uniform" and o.kind == "merge"
                 and o.members == r.members and o.seed_shift == r.seed_shift
                 and o.finetune_epochs == r.finetune_epochs and n != name), None)


def trained_further(name: str) -> str | None:
    """The control of train row `name`: the row that trains it further as the merges are trained
    after merging (same epochs, lr, objective), so that a merge trained further can be set against
    members given the same extra budget; None when there is none."""
    return next((n for n, o in rows().items() if o.kind == "train" and o.finetune_epochs
                 and o.init_from == name), None)


def members_trained_as_long(name: str) -> tuple | None:
    """For a merge trained further: the control row of each of its members (`trained_further`),
    in the members' order, its budget-matched reference; None for every other row."""
    r = get_row(name)
    controls = tuple(trained_further(m) for m in r.members)
    return controls if r.finetune_epochs and controls and all(controls) else None
