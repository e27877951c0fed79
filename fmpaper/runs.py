"""The table's rows as runs on disk: every path, the run cache, Fishers, merges and reading back.

This is the one module that knows the folder layout:

  runs root  $FMPAPER_RUNS, else <cache>/runs with <cache> = fmpaper.data.cache_dir()
             (~/.cache/fmpaper: outside the work tree, so long trainings survive a fresh checkout)
    <dataset>/<profile>/s<seed>/<row>-<hash>/        a finished run (see fmpaper.train)
    <dataset>/<profile>/s<seed>/<row>-<hash>.partial/ a training in progress (resumable)
    <dataset>/<profile>/s<seed>/<row>-<hash>.lock     held while a process computes the run
    <dataset>/<profile>/s<seed>/fisher/<member>-<estimator>-<hash>.safetensors   Fisher artifacts
  results    $FMPAPER_RESULTS, else results/ of the checkout
    <dataset>-<profile>/runs.csv, tables, figures/, notebooks/   written by the pages
    <dataset>-<profile>/checkpoints/<row>-s<seed>.safetensors + .json   kept weights (trained, merged)
  the paper  fmpaper/paper/table.csv (inside the package)

A run is cached under a hash of what defines it (its resolved config; for combined rows the
members' identities and the merge settings), so a finished run is never recomputed and a killed
training resumes from `<dir>.partial`. Merged rows use the members trained with the same seed.
Two processes that need the same run or Fisher compute it once: the second waits on the lock and
then reads it from the cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import FmpaperError, environment
from .config import Config, make_config
from .data import SeqData, cache_dir
from .evaluate import PROTOCOLS, metrics_from_ranks, ndcg, ranks
from .fisher import compute_fisher, load_fisher, save_fisher
from .merge import fisher_merge, uniform_merge
from .rows import FisherSpec, Row, get_row, in_family, rows, with_needs
from .train import finish_run, hardware, load_data, load_run, partial_dir, train

PAPER_TABLE = Path(__file__).with_name("paper") / "table.csv"
PAPER_DATASET = "ml-1m"     # the dataset of the published table
# paper table column of each (mode, metric) the paper reports
PAPER_COLUMNS = {
    ("full", "ndcg@10"): "full_ndcg10", ("full", "ndcg@20"): "full_ndcg20",
    ("uni100", "ndcg@10"): "random_ndcg10", ("uni100", "ndcg@20"): "random_ndcg20",
    ("pop100", "ndcg@10"): "popular_ndcg10", ("pop100", "ndcg@20"): "popular_ndcg20",
}


# ----------------------------------------------------------------------------- paths

def repo_root() -> Path | None:
    """The source checkout holding this package (None for an installed copy)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def runs_root() -> Path:
    if os.environ.get("FMPAPER_RUNS"):
        return Path(os.environ["FMPAPER_RUNS"])
    return cache_dir() / "runs"


def results_root() -> Path:
    if os.environ.get("FMPAPER_RESULTS"):
        return Path(os.environ["FMPAPER_RESULTS"])
    return (repo_root() or Path.cwd()) / "results"


def dataset_name(dataset: str | None, profile: str) -> str:
    """The dataset a profile runs on (None: the profile's default), as named in paths."""
    return Path(make_config(profile, dataset=dataset).dataset).stem


def results_dir(dataset: str | None, profile: str) -> Path:
    return results_root() / f"{dataset_name(dataset, profile)}-{profile}"


def checkpoint_dir(dataset: str | None, profile: str) -> Path:
    return results_dir(dataset, profile) / "checkpoints"


def relative_run(path: Path) -> str:
    """A run directory relative to the runs root (as printed and recorded)."""
    try:
        return str(Path(path).relative_to(runs_root()))
    except ValueError:
        return str(path)


def load_paper_table() -> pd.DataFrame:
    """The published table (ML-1M), indexed by row."""
    if not PAPER_TABLE.is_file():
        raise FmpaperError(f"the paper's table {PAPER_TABLE} is missing; reinstall fmpaper")
    return pd.read_csv(PAPER_TABLE).set_index("row")


# ----------------------------------------------------------------------------- data, once

_DATA: dict = {}


def dataset(cfg: Config) -> SeqData:
    """The data of a config, loaded once per process (every run of a session shares it)."""
    key = (cfg.dataset, cfg.max_len, cfg.min_count, cfg.max_users)
    if key not in _DATA:
        _DATA[key] = load_data(cfg)
    return _DATA[key]


def profile_data(dataset_: str | None, profile: str, max_users: int | None = None) -> SeqData:
    """The data a profile trains on (max_users=0: the whole dataset, whatever the profile says)."""
    return dataset(make_config(profile, dataset=dataset_, max_users=max_users))


def load(run: Path):
    """A finished run (fmpaper.train.load_run), sharing the loaded dataset."""
    conf = Path(run) / "config.json"
    if not conf.is_file():
        return load_run(run)
    return load_run(run, data=dataset(Config.from_dict(json.loads(conf.read_text()))))


def validation_inputs(data: SeqData):
    """Every user's validation input (the sequences the authors computed the Fisher on)."""
    return data.inputs(data.eval_targets("valid"), torch.arange(data.n_users))


# ----------------------------------------------------------------------------- the run cache

def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def train_config(row: Row, dataset_: str | None, profile: str, seed: int, **overrides) -> Config:
    if row.finetune_epochs:       # a trained run trained further, exactly as a merge of it would be
        base = train_config(get_row(row.init_from), dataset_, profile, seed, **overrides)
        return finetune_config(base, row.finetune_epochs, row.finetune_lr, init_from=row.init_from)
    return make_config(profile, variant=row.variant, dataset=dataset_, seed=seed,
                       **{**dict(row.settings), **overrides})


# Row fields that say how a row is shown or where it runs, not what it computes
_PRESENTATION = ("name", "label", "paper", "members", "settings", "family", "counterpart", "profiles")
# Row fields added after merges were first cached: left out of the identity at their default
_LATER_ROW_FIELDS = {"finetune_lr": None, "seed_shift": ()}


def identity(row: Row, dataset_, profile, seed, overrides) -> dict:
    """What defines a run: its resolved config (and the identity of the run it starts from), and
    for combined rows the merge settings and the members' identities."""
    if row.kind == "train":
        ident = train_config(row, dataset_, profile, seed, **overrides).identity()
        if row.init_from:
            ident["init"] = identity(get_row(row.init_from), dataset_, profile, seed, overrides)
        return ident
    ident = {k: v for k, v in row.__dict__.items()
             if k not in _PRESENTATION and not (k in _LATER_ROW_FIELDS and v == _LATER_ROW_FIELDS[k])}
    ident["members"] = [identity(get_row(m), dataset_, profile, s, overrides) for m, s in row.needs(seed)]
    return ident


def seed_dir(dataset_: str | None, profile: str, seed: int, root: Path | None = None) -> Path:
    """The folder of every run of one (dataset, profile, seed): <runs root>/<dataset>/<profile>/s<seed>."""
    return Path(root or runs_root()) / dataset_name(dataset_, profile) / profile / f"s{seed}"


def run_dir(name: str, dataset_: str | None = None, profile: str = "quick", seed: int = 0,
            root: Path | None = None, **overrides) -> Path:
    ident = identity(get_row(name), dataset_, profile, seed, overrides)
    return seed_dir(dataset_, profile, seed, root) / f"{name}-{_hash(ident)}"


# the epoch-budget check of a profile: SASRec trained this many epochs, never stopped early
CURVE_EPOCHS = 8
CURVE_NAME = f"curve-sasrec-e{CURVE_EPOCHS}"


def curve_dir(dataset_: str | None, profile: str, seed: int = 0, root: Path | None = None) -> Path:
    """Where `fmpaper curve` trains SASRec for CURVE_EPOCHS epochs without early stopping: the
    validation NDCG@10 of every epoch shows whether the profile's epochs suffice on a dataset."""
    return seed_dir(dataset_, profile, seed, root) / CURVE_NAME


def curve_config(dataset_: str | None, profile: str, seed: int = 0) -> Config:
    return make_config(profile, dataset=dataset_, seed=seed, epochs=CURVE_EPOCHS, patience=CURVE_EPOCHS)


def run_curve(dataset_: str | None, profile: str, seed: int = 0, progress: bool = True) -> dict:
    """Metrics of the epoch-budget check (`curve_dir`), training it (resumably) if needed."""
    out = curve_dir(dataset_, profile, seed)
    if is_finished(out):
        return metrics_of(out)
    cfg = curve_config(dataset_, profile, seed)
    return train(cfg, out, progress=progress, data=dataset(cfg))


# the rows whose twins trained with random batches (group_by_length = false) the results page
# sets beside them: the check that grouping batches by length changes nothing beyond seed noise
BATCH_CHECK = ("duorec_unsup", "cl4srec")
RANDOM_BATCHES = "+random_batches"     # the name suffix of such a twin among the kept checkpoints


def extra_runs() -> list[str]:
    """Names of the runs the pages read besides the table's rows, kept and restored like them:
    the epoch-budget curve and the random-batch twins."""
    return [CURVE_NAME, *(n + RANDOM_BATCHES for n in BATCH_CHECK)]


def kept_target(name: str, dataset_: str | None, profile: str, seed: int, root: Path | None = None) -> tuple[Path, Config]:
    """(run dir, config it must hold) of a run with kept weights (`kept_weights`) or one of
    `extra_runs`."""
    if name == CURVE_NAME:
        return curve_dir(dataset_, profile, seed, root), curve_config(dataset_, profile, seed)
    if name.endswith(RANDOM_BATCHES) and name.removesuffix(RANDOM_BATCHES) in BATCH_CHECK:
        base = name.removesuffix(RANDOM_BATCHES)
        return (run_dir(base, dataset_, profile, seed, root, group_by_length=False),
                train_config(get_row(base), dataset_, profile, seed, group_by_length=False))
    row = get_row(name)
    if row.kind == "train":
        cfg = train_config(row, dataset_, profile, seed)
    else:   # a merge holds its first member's config; trained further, the training that implies
        first, s0 = row.needs(seed)[0]
        cfg = train_config(get_row(first), dataset_, profile, s0)
        if row.finetune_epochs:
            cfg = finetune_config(cfg, row.finetune_epochs, row.finetune_lr)
    return run_dir(name, dataset_, profile, seed, root), cfg


def run_row(name: str, dataset_: str | None = None, profile: str = "quick", seed: int = 0,
            root: Path | None = None, progress: bool = True, **overrides) -> dict:
    """Metrics of row `name`, computing (and caching) it and whatever it needs first."""
    row = get_row(name)
    out = run_dir(name, dataset_, profile, seed, root, **overrides)
    if is_finished(out):
        return complete(out)
    for dep, s in row.needs(seed):
        run_row(dep, dataset_, profile, s, root, progress, **overrides)
    with exclusive(out):
        if is_finished(out):                     # another process finished it while this one waited
            return complete(out)
        if row.kind == "train":
            cfg = train_config(row, dataset_, profile, seed, **overrides)
            init = None
            if row.init_from:
                init = start_weights(cfg, run_dir(row.init_from, dataset_, profile, seed, root, **overrides))
            return train(cfg, out, progress=progress, data=dataset(cfg), init=init)
        member_dirs = [run_dir(m, dataset_, profile, s, root, **overrides) for m, s in row.needs(seed)]
        return combine(row, member_dirs, out, progress)


@contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on `<path>.lock` for the block. Two processes that need the same
    run (two lanes of `reproduce`, two `fmpaper row` calls) would otherwise both train it into
    one `.partial` folder, or the slower would find it finished and fail; the lock dies with its
    process, so a killed run leaves nothing to clean up. Locks are taken only after a run's
    dependencies are finished, run before Fisher, so two processes never wait on each other."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# the fields a run must share with the run it starts from or with the runs it is merged with
SHARED_FIELDS = ("dataset", "max_users", "min_count", "max_len", "hidden", "n_layers", "n_heads", "inner")


def unshared_field(a: Config, b: Config) -> str | None:
    """The first of SHARED_FIELDS in which two configs differ (None: they can be combined)."""
    return next((f for f in SHARED_FIELDS if getattr(a, f) != getattr(b, f)), None)


def base_dir(cfg: Config) -> Path:
    """The run `cfg.init_from` names: a row (same dataset, profile and seed) or a run directory."""
    if cfg.init_from in rows():
        return run_dir(cfg.init_from, cfg.dataset, cfg.profile, cfg.seed)
    return Path(cfg.init_from)


def start_weights(cfg: Config, base: Path) -> dict:
    """The weights a run with `init_from` starts from: the finished base run's, with the mask
    token's row zeroed for CL4SRec (the authors appended a zero row to SASRec's table; every
    model here reserves that row, so it is reset instead). Checked before anything is written."""
    base = Path(base)
    if not is_finished(base):
        state = "unfinished" if partial_dir(base).exists() or base.exists() else "missing"
        raise FmpaperError(f"init_from: run {base} is {state} (train it first: it needs a metrics.json)")
    run = load(base)
    field = unshared_field(run.cfg, cfg)
    if field:
        raise FmpaperError(f"init_from: {base.name} has {field} = {getattr(run.cfg, field)!r}, "
                           f"this run needs {getattr(cfg, field)!r}")
    state = {k: v.clone() for k, v in run.model.state_dict().items()}
    if cfg.variant == "cl4srec":
        state["item_emb.weight"][run.model.mask_id] = 0.0
    return state


def complete(run: Path) -> dict:
    """The metrics of a finished run, with every protocol of fmpaper.evaluate.PROTOCOLS: a
    protocol added after the run finished is evaluated now (from its checkpoint; an ensemble
    from its members) and written into metrics.json and ranks.safetensors (each replaced whole)."""
    run = Path(run)
    m = metrics_of(run)
    missing = [p for p in PROTOCOLS if p not in m["test"]]
    if not missing:
        return m
    model, data, seed = scorer(run, m)
    all_ranks = ranks_of(run)
    for p in missing:
        r = ranks(model, data, p, seed)
        m["test"][p] = {mode: metrics_from_ranks(x) for mode, x in r.items()}
        all_ranks.update({f"{p}.{mode}": x for mode, x in r.items()})
    _replace(run / "ranks.safetensors", lambda tmp: save_file(all_ranks, str(tmp)))
    _replace(run / "metrics.json", lambda tmp: tmp.write_text(json.dumps(m, indent=2, sort_keys=True)))
    return m


def scorer(run: Path, metrics: dict | None = None) -> tuple:
    """What scores a finished run's users, its data and evaluation seed: (model, data, seed). The
    run's checkpoint, or for an output ensemble (no checkpoint) its members'."""
    run = Path(run)
    if (run / "model.safetensors").is_file():
        loaded = load(run)
        return loaded.model, loaded.data, loaded.cfg.seed
    members = [load(run.parent / name) for name in (metrics or metrics_of(run))["members"]]   # see member_names
    return Ensemble([r.model for r in members]).eval(), members[0].data, members[0].cfg.seed


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def fisher_path(member_dir: Path, spec: FisherSpec) -> Path:
    key = _hash([spec.k, spec.batchwise, spec.authors])
    return Path(member_dir).parent / "fisher" / f"{Path(member_dir).name}-{spec.estimator}-{key}.safetensors"


def fisher_of(member_dir: Path, spec: FisherSpec, progress: bool = True, path: Path | None = None,
              seed: int | None = None) -> tuple[dict, dict]:
    """The Fisher of a trained run over its validation inputs: read from `path` (default: the
    cache next to the runs) or computed and written there atomically. `seed` draws the sampled
    items (default: the run's seed); the cache holds only Fishers of the run's seed."""
    if path is None and seed is not None:
        raise FmpaperError("fisher_of: a Fisher of another seed than the run's needs its own path")
    cached = path is None
    path = fisher_path(member_dir, spec) if cached else Path(path)
    with exclusive(path) if cached else nullcontext():     # the cache's Fishers: computed once
        if path.exists():
            return load_fisher(path)
        run = load(member_dir)
        seq, lengths, targets = validation_inputs(run.data)
        fisher, meta = compute_fisher(run.model, seq, lengths, targets, spec.estimator, k=spec.k,
                                      batchwise=spec.batchwise, authors=spec.authors,
                                      seed=run.cfg.seed if seed is None else seed,
                                      progress=progress, return_meta=True)
        meta.update(run=Path(member_dir).name, dataset=run.cfg.dataset, hardware=hardware())
        save_fisher(path, fisher, meta)
        return fisher, meta


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


def combine(row: Row, member_dirs: list[Path], out: Path, progress: bool = True) -> dict:
    """Compute a merge or ensemble row from its trained members into run directory `out`."""
    metrics = {"row": row.name, "members": member_names(member_dirs, out)}
    if row.kind == "ensemble":
        runs = [load(d) for d in member_dirs]
        part = partial_dir(out)
        part.mkdir(parents=True, exist_ok=True)
        ens = Ensemble([r.model for r in runs]).eval()
        return finish_run(part, out, None, runs[0].data, runs[0].cfg, metrics, ranks_of=ens)
    fishers = None
    if row.fisher is not None:
        computed = [fisher_of(d, row.fisher, progress=progress) for d in member_dirs]
        fishers = [f for f, _ in computed]
        metrics["fisher"] = [meta for _, meta in computed]
        metrics["fisher_seconds"] = sum(meta["seconds"] for _, meta in computed)
    return merge_runs(member_dirs, out, fishers, finetune_epochs=row.finetune_epochs,
                      finetune_lr=row.finetune_lr, metrics=metrics, progress=progress)


def finetune_config(member: Config, epochs: int, lr: float | None = None, init_from: str = "") -> Config:
    """The training of a merged model afterwards, as the authors ran it: CE only, `epochs`
    epochs at `lr` (default: the member's), the last epoch kept. The members' maximum epochs
    (the profile's) caps it, as it caps every training of a profile. `init_from`: the run it
    starts from when that is a trained row (the control rows `<member>_tuned`), "" for a merge."""
    epochs = min(epochs, member.epochs)
    d = json.loads(member.to_json())
    d.update(variant="sasrec", epochs=epochs, patience=epochs, select="last", lr=lr or member.lr,
             init_from=init_from, cl4srec_inplace=False)
    return Config.from_dict(d)


def member_names(member_dirs: list[Path], out: Path) -> list[str]:
    """How metrics.json names a combined run's members: relative to the run's own folder
    (a member of another seed as ../s<seed>/<run>)."""
    return [Path(os.path.relpath(d, Path(out).parent)).as_posix() for d in member_dirs]


def merge_runs(member_dirs: list[Path], out: Path, fishers: list[dict] | None = None, lambdas=None,
               floor: float = 1e-10, finetune_epochs: int = 0, finetune_lr: float | None = None,
               metrics: dict | None = None, progress: bool = True) -> dict:
    """Merge trained runs into run directory `out`: Fisher-weighted with `fishers`, else uniform;
    optionally trained `finetune_epochs` more with CE (`finetune_config`). Evaluated like a
    trained run. Members must share the data and the architecture (SHARED_FIELDS)."""
    out = Path(out)
    if is_finished(out):
        raise FmpaperError(f"{out} already holds a finished run; choose another --out")
    runs = [load(d) for d in member_dirs]
    cfg, data = runs[0].cfg, runs[0].data
    for d, r in zip(member_dirs[1:], runs[1:]):
        field = unshared_field(r.cfg, cfg)
        if field:
            raise FmpaperError(f"cannot merge {Path(d).name} ({field} = {getattr(r.cfg, field)!r}) with "
                               f"{Path(member_dirs[0]).name} ({field} = {getattr(cfg, field)!r})")
    t0 = time.perf_counter()
    states = [r.model.state_dict() for r in runs]
    merged = uniform_merge(states) if fishers is None else fisher_merge(states, fishers, lambdas, floor)
    metrics = dict(metrics or {}, method="uniform" if fishers is None else "fisher",
                   lambdas=lambdas, floor=floor, merge_seconds=time.perf_counter() - t0,
                   members=member_names(member_dirs, out))
    if finetune_epochs:
        ft = finetune_config(cfg, finetune_epochs, finetune_lr)
        metrics["finetune"] = {"epochs": ft.epochs, "objective": "sasrec (CE)", "lr": ft.lr, "kept": "last epoch"}
        return train(ft, out, progress=progress, data=data, init=merged, extra=metrics)
    part = partial_dir(out)
    part.mkdir(parents=True, exist_ok=True)
    model = runs[0].model
    model.load_state_dict(merged)
    return finish_run(part, out, model.eval(), data, cfg, metrics)


# ----------------------------------------------------------------------------- reading runs back

def finished(dataset_, profile, seeds, names=None) -> tuple[dict, list]:
    """({(row, seed): finished run dir}, [missing 'row' or 'row (seed s)']) over `names`
    (default: every row that runs in `profile`)."""
    names = list(names) if names is not None else in_family(None, profile)
    found, missing = {}, []
    for s in seeds:
        for name in names:
            d = run_dir(name, dataset_, profile, s)
            if is_finished(d):
                found[(name, s)] = d
            else:
                missing.append(name if len(seeds) == 1 else f"{name} (seed {s})")
    return found, missing


# While `finished_by` holds, runs finished after its time count as unfinished, in this process
# and in the notebook kernels it starts: pages executed while a training goes on beside them then
# all show one set of runs, the one runs.csv and the kept checkpoints hold.
FINISHED_BY = "FMPAPER_FINISHED_BY"


def is_finished(run: Path) -> bool:
    """A run is finished once its metrics.json exists (training and combining write it last,
    whole), and, within `finished_by(t)`, was written by time t."""
    metrics = Path(run) / "metrics.json"
    if not metrics.is_file():
        return False
    by = os.environ.get(FINISHED_BY)
    return by is None or metrics.stat().st_mtime <= float(by)


def finished_by(t: float):
    """Within the block (and in processes started in it) only runs finished by time t count."""
    return environment({FINISHED_BY: repr(float(t))})


def metrics_of(run: Path) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


def ranks_of(run: Path) -> dict[str, torch.Tensor]:
    """The test rank of every user under each '<protocol>.<mode>' (ranks.safetensors)."""
    return load_file(str(Path(run) / "ranks.safetensors"))


def user_ndcg(run: Path, key: str, k: int = 10):
    """Per-user NDCG@k (numpy) of a finished run under '<protocol>.<mode>'."""
    return ndcg(ranks_of(run)[key], k).numpy()


RUN_COLUMNS = ["row", "label", "kind", "family", "paper", "k", "seed", "protocol", "mode", "metric", "value",
               "valid_ndcg10", "best_epoch", "epochs_run", "train_seconds", "fisher_seconds", "merge_seconds", "wall_seconds",
               "hardware", "run"]


def collect(dataset_: str | None, profile: str, seeds: list[int], names=None) -> pd.DataFrame:
    """Every finished run's test metrics, long (RUN_COLUMNS). Rows not run yet are left out and
    listed in `df.attrs["missing"]`."""
    found, missing = finished(dataset_, profile, seeds, names)
    records = []
    for (name, s), d in found.items():
        m = complete(d)
        r = get_row(name)
        secs = {k: float(m.get(f"{k}_seconds", 0.0)) for k in ("train", "fisher", "merge")}
        base = dict(row=name, label=r.label, kind=r.kind, family=r.family, paper=r.paper, k=r.k,
                    seed=s, valid_ndcg10=m.get("valid_ndcg@10"), best_epoch=m.get("best_epoch"),
                    epochs_run=m.get("epochs_run"), train_seconds=secs["train"],
                    fisher_seconds=secs["fisher"], merge_seconds=secs["merge"],
                    wall_seconds=sum(secs.values()), hardware=m.get("hardware", "?"), run=d.name)
        for protocol, modes in m["test"].items():
            for mode, vals in modes.items():
                for metric, v in vals.items():
                    records.append(dict(base, protocol=protocol, mode=mode, metric=metric, value=float(v)))
    df = pd.DataFrame.from_records(records, columns=RUN_COLUMNS)
    df.attrs.update(dataset=dataset_name(dataset_, profile), profile=profile, seeds=list(seeds), missing=missing)
    return df


def check_nothing_dropped(dataset_: str | None, profile: str, new: pd.DataFrame) -> None:
    """FmpaperError if the written results/<set>/runs.csv holds a run (row, seed) that `new`
    lacks (rows that no longer exist aside): rewriting runs.csv with `new` would lose it."""
    path = results_dir(dataset_, profile) / "runs.csv"
    if not path.is_file():
        return
    old = pd.read_csv(path, usecols=["row", "seed"]).drop_duplicates()
    have = set(zip(new["row"], new["seed"].astype(int)))
    lost = sorted((r, int(s)) for r, s in zip(old["row"], old["seed"]) if r in rows() and (r, int(s)) not in have)
    if lost:
        name = dataset_name(dataset_, profile)
        raise FmpaperError(
            f"{path.parent.name}/runs.csv holds {len(lost)} run(s) that this run cache or these seeds lack "
            f"({', '.join(f'{r} seed {s}' for r, s in lost[:3])}{', ...' if len(lost) > 3 else ''}): "
            f"`fmpaper restore --dataset {name} --profile {profile}` brings back the kept ones, `fmpaper reproduce` "
            f"with the set's seeds computes the rest; runs.csv and the tables are left as they are")


# ----------------------------------------------------------------------------- kept checkpoints

def checkpoint_files(dataset_: str | None, profile: str, name: str, seed: int) -> tuple[Path, Path]:
    """(weights, config) of a kept checkpoint: <row>-s<seed>.safetensors and .json."""
    stem = checkpoint_dir(dataset_, profile) / f"{name}-s{seed}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def kept_checkpoints(dataset_: str | None, profile: str) -> set[tuple[str, int]]:
    """{(row, seed)} of every kept checkpoint of a set, read back from the names `checkpoint_files` gives."""
    found = (re.fullmatch(r"(.+)-s(\d+)", f.stem) for f in checkpoint_dir(dataset_, profile).glob("*.safetensors"))
    return {(m.group(1), int(m.group(2))) for m in found if m}


def checkpoint_record(dataset_: str | None, profile: str, name: str, seed: int) -> Path:
    """The training record kept beside a checkpoint (<row>-s<seed>.record.json): the run's
    metrics.json without its test metrics (best epoch, epochs run, seconds, hardware, ...) and its
    per-epoch history, so that a run restored from the checkpoint reads as the run that trained it."""
    return checkpoint_dir(dataset_, profile) / f"{name}-s{seed}.record.json"


def training_record(run: Path) -> dict:
    """{"metrics", "history"} of a finished run, as `checkpoint_record` keeps them: what training
    recorded, without the test metrics and data summary (recomputed on restore) and without where
    a restored run came from (`restored_from`, `restored_on`: facts of that copy, not of training)."""
    m = {k: v for k, v in metrics_of(run).items() if k not in ("test", "data") and not k.startswith("restored_")}
    h = Path(run) / "history.json"
    return {"metrics": m, "history": json.loads(h.read_text()) if h.is_file() else None}


def trained_weights(row: Row) -> bool:
    """Whether a row's weights come out of training (a trained row, or a merge trained further
    after merging): recomputing them means training, so `verify` restores them from their kept
    checkpoints, where it recomputes every other merge from its members."""
    return row.kind == "train" or bool(row.finetune_epochs)


def kept_weights(row: Row) -> bool:
    """Whether a row's checkpoint is kept: every row with weights of its own (trained, merged, or
    both). A merge's weights are kept although `verify` recomputes them, because its Fishers cost
    up to an hour per seed on ML-1M: `restore` then rebuilds it in seconds. An output ensemble has
    no weights (it is recomputed from its members)."""
    return row.kind != "ensemble"


def kept_runs(dataset_: str | None, profile: str, seeds: list[int]) -> dict:
    """{(row, seed): run dir} of every finished run with kept weights that the profile's rows for
    `seeds` use, members of other seeds (seed_shift) included, and of the `extra_runs`."""
    out = {}
    for name, seed in with_needs((n, s) for s in seeds for n in in_family(None, profile)):
        d = run_dir(name, dataset_, profile, seed)
        if kept_weights(get_row(name)) and is_finished(d):
            out[(name, seed)] = d
    for name in extra_runs():
        for seed in seeds:
            d = kept_target(name, dataset_, profile, seed)[0]
            if is_finished(d):
                out[(name, seed)] = d
    return out


def keep_checkpoints(dataset_: str | None, profile: str, seeds: list[int]) -> list[Path]:
    """Copy the kept weights (`kept_runs`), config and training record of every finished run into
    the results folder (results/<dataset>-<profile>/checkpoints/), so a reader can verify the book
    without retraining and restore the runs (`fmpaper restore`). Weights only (no optimizer state);
    each file lands whole (temporary name, then rename)."""
    kept = []
    for (name, seed), d in sorted(kept_runs(dataset_, profile, seeds).items()):
        weights, conf = checkpoint_files(dataset_, profile, name, seed)
        record = json.dumps(training_record(d), indent=1, sort_keys=True).encode()
        for data, dst in (((d / "model.safetensors").read_bytes(), weights), ((d / "config.json").read_bytes(), conf),
                          (record, checkpoint_record(dataset_, profile, name, seed))):
            if dst.is_file() and dst.read_bytes() == data:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            _replace(dst, lambda tmp: tmp.write_bytes(data))
        kept.append(weights)
    return kept
