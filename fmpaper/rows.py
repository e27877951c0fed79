"""The rows of the paper's table, declared in rows.toml, and how each Fisher is specified.

`Row` is one row (a trained model, a merge of trained rows, or an output ensemble); `FisherSpec`
is one Fisher estimate (estimator, k, batch-wise, the authors' form), used alike by the merge
rows, the Fisher cache and `fmpaper fisher`. Which estimators take k is decided in one place,
`fmpaper.fisher.TAKES_K`; `FisherSpec` enforces it.
"""
from __future__ import annotations

import numbers
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import FmpaperError
from .fisher import ESTIMATORS, SAMPLED, TAKES_K

ROWS_FILE = Path(__file__).with_name("rows.toml")

ESTIMATOR_NAMES = {"exact": "exact", "target": "target item", "random": "random sampling",
                   "topk": "top-k sampling", "model": "model-based sampling", "bruteforce": "brute force"}


@dataclass(frozen=True)
class FisherSpec:
    """One diagonal-Fisher estimate of a model over its validation inputs (fmpaper.fisher)."""
    estimator: str                     # one of fisher.ESTIMATORS
    k: int | None = None               # items drawn per sequence: only for fisher.TAKES_K
    batchwise: bool = False            # the poster's batch-sum approximation (sampled estimators)
    authors: bool = False              # the authors' target-item form (logits / 10)

    def __post_init__(self):
        e, k = self.estimator, self.k
        if e not in ESTIMATORS:
            raise FmpaperError(f"unknown Fisher estimator {e!r}; choose one of {', '.join(ESTIMATORS)}")
        if e in TAKES_K:
            if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
                raise FmpaperError(f"estimator {e} needs k >= 1 (items per sequence), got {k!r}")
        elif k is not None:
            raise FmpaperError(f"estimator {e} takes no k (got k={k}); only {', '.join(TAKES_K)} do")
        if self.batchwise and e not in SAMPLED:
            raise FmpaperError(f"batchwise applies to {', '.join(SAMPLED)}, not to {e}")
        if self.authors and e != "target":
            raise FmpaperError(f"the authors' form is a target-item Fisher; not available for {e}")

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
    batchwise: bool = False            # the poster's batch-sum Fisher approximation
    members: tuple = ()                # merge/ensemble rows: names of the train rows combined
    finetune_epochs: int = 0           # CE epochs after merging (the authors used 10)
    paper: bool = True                 # False: a reference row the paper does not have
    settings: tuple = ()               # train rows: Config overrides, ((field, value), ...)

    @property
    def fisher(self) -> FisherSpec | None:
        """The Fisher of each member (Fisher merges only)."""
        if self.kind != "merge" or self.method != "fisher":
            return None
        return FisherSpec(self.estimator, self.k, self.batchwise)

    @property
    def short_label(self) -> str:
        """The label as the tables show it: with k, and a † for reference rows."""
        k = f" ({self.k})" if self.kind == "merge" and self.k else ""
        return self.label + k + ("" if self.paper else " †")

    def describe(self) -> str:
        """What the row computes, in one line."""
        if self.kind == "train":
            what = f"trained with objective {self.variant}"
            if self.settings:
                what += " (" + ", ".join(f"{k} = {v}" for k, v in self.settings) + ")"
        elif self.kind == "ensemble":
            what = f"output ensemble of {', '.join(self.members)}"
        else:
            what = ("uniform merge" if self.method == "uniform" else f"Fisher merge ({self.fisher.describe()})")
            what += f" of {', '.join(self.members)}"
            if self.finetune_epochs:
                what += f", fine-tuned {self.finetune_epochs} epochs"
        return what


@lru_cache(maxsize=1)
def rows() -> dict[str, Row]:
    """Every row of rows.toml by name, in the file's order (the tables' order)."""
    spec = tomllib.loads(ROWS_FILE.read_text())
    defaults = spec["merge"]
    out = {}
    for r in spec["row"]:
        if r["kind"] != "train":
            r.setdefault("members", defaults["members"])
            r.setdefault("finetune_epochs", defaults["finetune_epochs"])
        row = Row(**{**r, "members": tuple(r.get("members", ())),
                     "settings": tuple(sorted(r.get("settings", {}).items()))})
        row.fisher  # validates estimator and k
        out[row.name] = row
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


def trained(paper_only: bool = False) -> list[str]:
    return [n for n, r in rows().items() if r.kind == "train" and (r.paper or not paper_only)]


def combined() -> list[str]:
    """The merge and ensemble rows."""
    return [n for n, r in rows().items() if r.kind != "train"]


def fisher_merges() -> list[str]:
    return [n for n, r in rows().items() if r.fisher is not None]
