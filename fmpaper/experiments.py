"""The paper's table as runs: rows from rows.toml, each run cached by a hash of what defines it.

Layout under the runs root ($FMPAPER_RUNS, else ~/.cache/fmpaper/runs, outside the work tree):
  <dataset>/<profile>/s<seed>/<row>-<hash>/          a finished run (see fmpaper.train)
  <dataset>/<profile>/s<seed>/fisher/<member>-<estimator>-<hash>.safetensors   Fisher artifacts
A finished run is never recomputed; a killed training resumes from `<dir>.partial`.
Merged rows use the members trained with the same seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import FmpaperError
from .config import Config, make_config
from .data import SeqData, cache_dir
from .fisher import ESTIMATORS, compute_fisher, load_fisher, save_fisher
from .merge import fisher_merge, uniform_merge
from .train import finish_run, hardware, load_data, load_run, train

ROWS_FILE = Path(__file__).with_name("rows.toml")


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    kind: str                          # "train", "merge" or "ensemble"
    variant: str | None = None         # train rows: the objective
    method: str = "fisher"             # merge rows: "fisher" or "uniform"
    estimator: str | None = None       # fisher merges: one of fisher.ESTIMATORS
    k: int | None = None               # items per sequence for random/topk/model
    batchwise: bool = False            # the poster's batch-sum Fisher approximation
    members: tuple = ()                # merge/ensemble rows: names of the train rows combined
    finetune_epochs: int = 0           # CE epochs after merging (the authors used 10)
    paper: bool = True                 # False: a reference row the paper does not have
    settings: tuple = ()               # train rows: Config overrides, ((field, value), ...)


@lru_cache(maxsize=1)
def rows() -> dict[str, Row]:
    spec = tomllib.loads(ROWS_FILE.read_text())
    defaults = spec["merge"]
    out = {}
    for r in spec["row"]:
        if r["kind"] != "train":
            r.setdefault("members", defaults["members"])
            r.setdefault("finetune_epochs", defaults["finetune_epochs"])
        out[r["name"]] = Row(**{**r, "members": tuple(r.get("members", ())),
                                "settings": tuple(sorted(r.get("settings", {}).items()))})
    return out


def get_row(name: str) -> Row:
    if name not in rows():
        raise FmpaperError(f"unknown row {name!r}; rows are: {', '.join(rows())}")
    return rows()[name]


def runs_root() -> Path:
    """$FMPAPER_RUNS, else runs/ in the cache folder (fmpaper.data.cache_dir, outside the work tree)."""
    if os.environ.get("FMPAPER_RUNS"):
        return Path(os.environ["FMPAPER_RUNS"])
    return cache_dir() / "runs"


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def train_config(row: Row, dataset: str | None, profile: str, seed: int, **overrides) -> Config:
    return make_config(profile, variant=row.variant, dataset=dataset, seed=seed,
                       **{**dict(row.settings), **overrides})


def _identity(row: Row, dataset, profile, seed, overrides) -> dict:
    """What defines a run: its resolved config, and for combined rows its members' identities."""
    if row.kind == "train":
        return json.loads(train_config(row, dataset, profile, seed, **overrides).to_json())
    ident = {k: v for k, v in row.__dict__.items() if k not in ("name", "label", "paper", "members", "settings")}
    ident["members"] = [_identity(get_row(m), dataset, profile, seed, overrides) for m in row.members]
    return ident


def run_dir(name: str, dataset: str | None = None, profile: str = "quick", seed: int = 0,
            root: Path | None = None, **overrides) -> Path:
    row = get_row(name)
    cfg = make_config(profile, dataset=dataset, seed=seed, **overrides)
    ident = _identity(row, dataset, profile, seed, overrides)
    return Path(root or runs_root()) / Path(cfg.dataset).stem / profile / f"s{seed}" / f"{name}-{_hash(ident)}"


def run_row(name: str, dataset: str | None = None, profile: str = "quick", seed: int = 0,
            root: Path | None = None, progress: bool = True, **overrides) -> dict:
    """Metrics of row `name`, computing (and caching) it and whatever it needs first."""
    row = get_row(name)
    out = run_dir(name, dataset, profile, seed, root, **overrides)
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    if row.kind == "train":
        cfg = train_config(row, dataset, profile, seed, **overrides)
        return train(cfg, out, progress=progress, data=_data(cfg))
    member_dirs = []
    for m in row.members:
        run_row(m, dataset, profile, seed, root, progress, **overrides)
        member_dirs.append(run_dir(m, dataset, profile, seed, root, **overrides))
    return _combine(row, member_dirs, out, progress)


def _data(cfg: Config) -> SeqData:
    key = (cfg.dataset, cfg.max_len, cfg.min_count, cfg.max_users)
    if key not in _DATA:
        _DATA[key] = load_data(cfg)
    return _DATA[key]


_DATA: dict = {}


def fisher_of(member_dir: Path, estimator: str, k: int | None = None, batchwise: bool = False,
              authors: bool = False, progress: bool = True) -> tuple[dict, dict]:
    """The Fisher of a trained run over its validation inputs, cached next to the runs."""
    if estimator not in ESTIMATORS:
        raise FmpaperError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    k = None if estimator in ("exact", "bruteforce", "target") else k
    path = member_dir.parent / "fisher" / f"{member_dir.name}-{estimator}-{_hash([k, batchwise, authors])}.safetensors"
    if path.exists():
        return load_fisher(path)
    run = _load(member_dir)
    seq, lengths, targets = validation_inputs(run.data)
    fisher, meta = compute_fisher(run.model, seq, lengths, targets, estimator, k=k, batchwise=batchwise,
                                  authors=authors, seed=run.cfg.seed, progress=progress, return_meta=True)
    meta.update(run=member_dir.name, hardware=hardware())
    save_fisher(path, fisher, meta)
    return fisher, meta


def validation_inputs(data: SeqData):
    """Every user's validation input (the sequences the authors computed the Fisher on)."""
    return data.inputs(data.eval_targets("valid"), torch.arange(data.n_users))


class Ensemble(torch.nn.Module):
    """Scores = log of the members' mean predicted distribution (a plain output ensemble)."""

    def __init__(self, models):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def encode(self, seq, lengths):
        return torch.stack([m.encode(seq, lengths) for m in self.models], 1)   # (B, M, d)

    def logits(self, h):
        logp = torch.stack([m.logits(h[:, i]).log_softmax(-1) for i, m in enumerate(self.models)])
        return torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(len(self.models))))


def _combine(row: Row, member_dirs: list[Path], out: Path, progress: bool) -> dict:
    metrics = {"row": row.name, "members": [d.name for d in member_dirs]}
    if row.kind == "ensemble":
        runs = [_load(d) for d in member_dirs]
        part = out.with_name(out.name + ".partial")
        part.mkdir(parents=True, exist_ok=True)
        ens = Ensemble([r.model for r in runs]).eval()
        return finish_run(part, out, None, runs[0].data, runs[0].cfg, metrics, ranks_of=ens)
    fishers = None
    if row.method == "fisher":
        computed = [fisher_of(d, row.estimator, row.k, row.batchwise, progress=progress) for d in member_dirs]
        fishers = [f for f, _ in computed]
        metrics["fisher"] = [meta for _, meta in computed]
        metrics["fisher_seconds"] = sum(meta["seconds"] for _, meta in computed)
    return merge_runs(member_dirs, out, fishers, finetune_epochs=row.finetune_epochs, metrics=metrics,
                      progress=progress)


def _load(run_dir: Path):
    """load_run, sharing one loaded dataset among the runs of a session."""
    conf = Path(run_dir) / "config.json"
    return load_run(run_dir, data=_data(Config.from_dict(json.loads(conf.read_text()))) if conf.is_file() else None)


def merge_runs(member_dirs: list[Path], out: Path, fishers: list[dict] | None = None, lambdas=None,
               floor: float = 1e-10, finetune_epochs: int = 0, metrics: dict | None = None,
               progress: bool = True) -> dict:
    """Merge trained runs into run directory `out`: Fisher-weighted with `fishers`, else uniform;
    optionally fine-tuned `finetune_epochs` with CE afterwards. Evaluated like a trained run."""
    out = Path(out)
    if (out / "metrics.json").exists():
        raise FmpaperError(f"{out} already holds a finished run; choose another --out")
    runs = [_load(d) for d in member_dirs]
    cfg, data = runs[0].cfg, runs[0].data
    t0 = time.perf_counter()
    states = [r.model.state_dict() for r in runs]
    merged = uniform_merge(states) if fishers is None else fisher_merge(states, fishers, lambdas, floor)
    metrics = dict(metrics or {}, method="uniform" if fishers is None else "fisher",
                   lambdas=lambdas, floor=floor, merge_seconds=time.perf_counter() - t0,
                   members=[str(Path(d).name) for d in member_dirs])
    if finetune_epochs:
        ft = Config.from_dict({**json.loads(cfg.to_json()), "variant": "sasrec",
                               "epochs": finetune_epochs, "patience": finetune_epochs})
        metrics["finetune"] = {"epochs": finetune_epochs, "objective": "sasrec (CE)"}
        return train(ft, out, progress=progress, data=data, init=merged, extra=metrics)
    part = out.with_name(out.name + ".partial")
    part.mkdir(parents=True, exist_ok=True)
    model = runs[0].model
    model.load_state_dict(merged)
    return finish_run(part, out, model.eval(), data, cfg, metrics)
