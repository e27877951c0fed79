"""The row notebooks (notebooks/train_row.ipynb, merge_row.ipynb): one row computed or read back
from the run cache, with its test metrics, training history and Fisher costs.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..evaluate import MODES, PROTOCOLS
from ..rows import Row
from ..runs import is_finished, relative_run, run_dir, run_row
from .display import METRICS, MODE_NAMES, Captioned, Provenance, Record, check_params, fmt_seconds


@dataclass
class RowReport:
    """One computed row: what it is, its test metrics and how long it took."""
    row: Row
    dataset: str
    profile: str
    seed: int
    run: Path
    metrics: dict
    computed_now: bool     # False: the run was found finished in the cache
    seconds: float         # wall time of this call

    def label(self) -> str:
        return f"{self.row.name} ({self.row.label}): {self.row.describe()}"

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
                facts["k"] = self.row.k or "–"
        for k, v in self.wall().items():
            facts[f"{k} wall time"] = fmt_seconds(v)
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
                       "seed": self.seed, "run": relative_run(self.run), "test": self.metrics["test"],
                       "hardware": self.metrics.get("hardware"), "wall": self.wall()})

    def _repr_html_(self) -> str:
        return (f"<p><strong>{html.escape(self.label())}</strong></p>"
                + self.provenance()._repr_html_())

    def __repr__(self) -> str:
        return f"{self.label()}\n{self.provenance()!r}"


def report(name, dataset=None, profile="smoke", seed=0, kind=None) -> RowReport:
    """Compute row `name` (or read it from the cache) and report it. `kind`: allowed row kinds."""
    p = check_params(row=name, dataset=dataset, profile=profile, seed=seed,
                     kind=tuple(kind) if kind else None)
    dataset = dataset or None
    out = run_dir(name, dataset, profile, p["seed"])
    cached = is_finished(out)
    t0 = time.perf_counter()
    metrics = run_row(name, dataset, profile, p["seed"], progress=False)
    return RowReport(p["row"], p["dataset"], profile, p["seed"], out, metrics, not cached,
                     time.perf_counter() - t0)
