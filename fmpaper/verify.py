"""`fmpaper verify` and `fmpaper restore`: the book's numbers from the kept checkpoints.

The repository keeps the weights of every trained and merged row the book shows
(results/<dataset>-<profile>/checkpoints/<row>-s<seed>.safetensors, with the run's config as
.json). `verify` rebuilds the trained runs in a scratch runs root, re-evaluates each checkpoint
under the three protocols (as-run, paper, corrected), recomputes every merge and ensemble from
them (Fishers included; kept merge weights are not used), and compares every test metric and
every trained row's validation NDCG@10 with the committed runs.csv.

Tasks run `jobs` at a time, each with cores/jobs threads as `fmpaper reproduce` trains them;
the progress bar counts work in the same units as reproduce's. The first mismatch, a missing
checkpoint or a checkpoint whose config is not its row's ends in one line and exit status 2.

`restore` rebuilds every kept run, merges included, in the run cache itself, and recomputes the
output ensembles (which have no weights) from their members, each checked against runs.csv as it
lands, with the record kept beside its checkpoint (or, for checkpoints kept without one, the
record runs.csv holds): a fresh machine can then compute new rows, pages or seeds of the
set without retraining or re-merging what the repository already holds.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from functools import cache, partial
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from . import FmpaperError, first_line
from .config import Config
from .evaluate import Comparison, comparisons, metrics_from_ranks, valid_comparison, valid_ndcg10
from .model import SASRec
from .reproduce import COMBINE_COST, row_cost, run_tasks
from .rows import get_row, in_family, rows, with_needs
from .runs import (checkpoint_dir, checkpoint_files, checkpoint_record, complete, dataset, dataset_name, exclusive,
                   extra_runs, is_finished, kept_checkpoints, kept_target, results_dir, run_dir, run_row, runs_root,
                   scorer, trained_weights)
from .train import finish_run, hardware, partial_dir

TOLERANCE = 1e-6
# A rank counts the candidates scored above the target, so a candidate whose score is within a
# rounding error of the target's may fall on either side on another processor (its vector units
# sum in another order): restoring ML-1M's cl4srec_as_run on an AMD EPYC moved one test user from
# rank 5 to 6. A value that differs beyond TOLERANCE is still accepted when it lies within what
# the ranks give with every score within TIE_EPS of the target's counted either way ("near-tied").
# Float32 scores of an ML-1M model are within 4.0e-6 of the same model's float64 scores, so two
# processors' scores differ by less than 1e-5.
TIE_EPS = 1e-5
EVAL_COST = 0.02       # one evaluation under the three protocols, in reproduce's work units


def restore_run(name: str, dataset_: str, profile: str, seed: int, root: str | Path,
                record: dict | None = None) -> dict:
    """Rebuild a kept run under runs root `root` from its checkpoint; its metrics. `record`
    ({"metrics", "history"}, see runs.training_record) is what the training or merge wrote
    besides the weights; the test metrics and validation NDCG@10 are always recomputed (the
    latter kept only where training records it: not for a plain merge)."""
    weights, conf = checkpoint_files(dataset_, profile, name, seed)
    if not weights.is_file() or not conf.is_file():
        raise FmpaperError(f"no kept checkpoint for row {name} seed {seed} ({weights.name} in {weights.parent})")
    try:
        cfg = Config.from_dict(json.loads(conf.read_text()))
    except (ValueError, TypeError) as e:                 # not JSON, or not a Config's fields
        raise FmpaperError(f"checkpoint config {conf.name} cannot be read: {first_line(e)}") from None
    out, expected = kept_target(name, dataset_, profile, seed, Path(root))
    got, want = cfg.identity(), expected.identity()
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise FmpaperError(f"checkpoint {conf.name} does not match row {name} seed {seed} "
                           f"(differs in {', '.join(diff)})")
    data = dataset(cfg)
    model = SASRec(data.n_items, cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # wrong shapes or names
        raise FmpaperError(f"checkpoint {weights.name} does not fit row {name}: {str(e).splitlines()[0]}") from None
    model.eval()
    record = record or {}
    recorded = record.get("metrics", {}).get("valid_ndcg@10")
    # the run's lock, as `fmpaper row` holds it: a training of the same run in another process
    # owns the .partial folder, so wait for it and read its run instead of clearing the folder
    with exclusive(out):
        if is_finished(out):
            return complete(out)
        valid = valid_ndcg10(model, data)
        if recorded is not None and not (abs(valid - recorded) <= TOLERANCE
                                         or near_tied(recorded, valid_comparison(model, data), "ndcg@10")):
            raise FmpaperError(f"mismatch, not restored: {name} seed {seed} validation NDCG@10: recorded "
                               f"{recorded:.8f}, recomputed {valid:.8f}")
        part = partial_dir(out)
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        metrics = {**record.get("metrics", {}), "restored_from": weights.name, "restored_on": hardware()}
        if recorded is not None or not _merged(name):
            metrics["valid_ndcg@10"] = valid
        return finish_run(part, out, model, data, cfg, metrics, record.get("history"))


def _merged(name: str) -> bool:
    """A merge not trained further: its runs record no validation NDCG@10."""
    return name in rows() and not trained_weights(get_row(name))


def _kind(name: str) -> str:
    """"train" for a run restored from a kept checkpoint (`runs.trained_weights`), else "combine"."""
    return "train" if trained_weights(get_row(name)) else "combine"


def _combine(name: str, dataset_: str, profile: str, seed: int, root: str) -> dict:
    return run_row(name, dataset_, profile, seed, root=Path(root), progress=False)


def _out(task: tuple, dataset_: str, profile: str, root: str | Path) -> Path:
    """The run directory a task finishes."""
    kind, name, seed = task
    return (kept_target(name, dataset_, profile, seed, Path(root))[0] if kind == "train"
            else run_dir(name, dataset_, profile, seed, Path(root)))


def _task(task: tuple, dataset_: str, profile: str, root: str) -> dict:
    kind, name, seed = task
    return (restore_run if kind == "train" else _combine)(name, dataset_, profile, seed, root)


def near_tied(value: float, comparison: Comparison, metric: str) -> bool:
    """`value` is what `metric` gives for some ranks within `comparison`'s near ties (TIE_EPS)."""
    best, worst = comparison.rank_bounds(TIE_EPS)
    return metrics_from_ranks(worst)[metric] - 1e-12 <= value <= metrics_from_ranks(best)[metric] + 1e-12


def compare(expected: pd.DataFrame, name: str, seed: int, metrics: dict, run: Path) -> tuple[list[str], int]:
    """Every mismatch between a recomputed run (finished in `run`) and its runs.csv lines, and
    how many values were equal only up to near-tied scores. A value beyond TOLERANCE is
    re-ranked from the run's scores and accepted if near-tied (TIE_EPS)."""
    bad, tied = [], 0
    lines = expected[(expected["row"] == name) & (expected["seed"] == seed)]
    scoring = cache(lambda: scorer(run, metrics))           # loaded only if some value differs

    @cache
    def ranking(protocol):
        model, data, eval_seed = scoring()
        return ({"full": valid_comparison(model, data)} if protocol == "valid"
                else comparisons(model, data, protocol, eval_seed))
    checks = [(f"{r['protocol']} {r['mode']} {r['metric']}", r["value"],
               metrics["test"][r["protocol"]][r["mode"]][r["metric"]], r["metric"], (r["protocol"], r["mode"]))
              for _, r in lines.iterrows()]
    if len(lines) and trained_weights(get_row(name)):
        checks.append(("validation NDCG@10", float(lines["valid_ndcg10"].iloc[0]), metrics["valid_ndcg@10"],
                       "ndcg@10", ("valid", "full")))
    for what, want, got, metric, key in checks:
        if abs(got - want) <= TOLERANCE:
            continue
        if near_tied(want, ranking(key[0])[key[1]], metric):
            tied += 1
        else:
            bad.append(f"{name} seed {seed} {what}: runs.csv {want:.8f}, recomputed {got:.8f}")
    return bad, tied


def verify(dataset_: str | None = "ml-100k", profile: str = "quick", jobs: int = 2, progress: bool = True,
           seeds: list[int] | None = None) -> dict:
    """Recompute every run of results/<dataset>-<profile>/runs.csv from the kept checkpoints and
    compare; FmpaperError on the first mismatch. Returns {"set", "runs", "values", "seeds", "seconds"}."""
    t0 = time.perf_counter()
    csv = results_dir(dataset_, profile) / "runs.csv"
    if not csv.is_file():
        raise FmpaperError(f"nothing to verify: no {csv}")
    if not checkpoint_dir(dataset_, profile).is_dir():
        raise FmpaperError(f"{dataset_name(dataset_, profile)}-{profile} has no kept checkpoints "
                           f"({checkpoint_dir(dataset_, profile)} is missing): it can only be checked by retraining")
    expected = pd.read_csv(csv)
    if seeds is not None:
        expected = expected[expected["seed"].isin(seeds)]
    pairs = expected.drop_duplicates(["row", "seed"])[["row", "seed"]].itertuples(index=False)
    # a run with trained weights is restored from its checkpoint; a merge or ensemble is recomputed
    # from its members, which are restored too (members of other seeds included)
    tasks = [(_kind(n), n, s) for n, s in with_needs(((row, int(seed)) for row, seed in pairs),
                                                      expand=lambda r: not trained_weights(r))]
    needs = {t: set() if t[0] == "train" else {(_kind(m), m, s) for m, s in get_row(t[1]).needs(t[2])} for t in tasks}
    # in hundredths of a SASRec training (reproduce's units)
    units = {t: round(100 * (EVAL_COST if t[0] == "train" else row_cost(t[1]) if get_row(t[1]).fisher
                             else COMBINE_COST / 10)) for t in tasks}
    checked = tied = 0
    with tempfile.TemporaryDirectory(prefix="fmpaper-verify-") as root:
        def check(task, metrics):
            nonlocal checked, tied
            _, name, seed = task
            bad, n_tied = compare(expected, name, seed, metrics, _out(task, dataset_, profile, root))
            if bad:
                more = f" (and {len(bad) - 1} more in this run)" if len(bad) > 1 else ""
                raise FmpaperError(f"mismatch: {bad[0]}{more}")
            checked += int(((expected["row"] == name) & (expected["seed"] == seed)).sum())
            tied += n_tied
        run_tasks(partial(_task, dataset_=dataset_, profile=profile, root=root), tasks, needs, jobs, units,
                  f"verify {dataset_name(dataset_, profile)}-{profile}", "runs", progress, on_done=check)
    return {"set": f"{dataset_name(dataset_, profile)}-{profile}", "runs": len(tasks), "values": checked,
            "tied": tied, "seeds": sorted(int(s) for s in set(expected["seed"])),
            "seconds": time.perf_counter() - t0}


def _tied(result: dict) -> str:
    return (f"; {result['tied']} of them only up to near-tied scores (a candidate within {TIE_EPS:g} of the "
            f"target's score may fall either way)" if result.get("tied") else "")


def summary(result: dict) -> str:
    return (f"verified {result['runs']} runs of {result['set']} (seeds {', '.join(map(str, result['seeds']))}): "
            f"all {result['values']} values of runs.csv recomputed within {TOLERANCE:g}{_tied(result)}, "
            f"in {result['seconds']:.0f} s")


# what runs.csv holds of a training record, for checkpoints kept without their record file
RECORD_COLUMNS = ("best_epoch", "epochs_run", "train_seconds", "fisher_seconds", "merge_seconds", "hardware")


def kept_record(expected: pd.DataFrame, dataset_: str, profile: str, name: str, seed: int) -> dict:
    """The training record of a kept checkpoint: its .record.json, else what runs.csv holds."""
    path = checkpoint_record(dataset_, profile, name, seed)
    if path.is_file():
        return json.loads(path.read_text())
    lines = expected[(expected["row"] == name) & (expected["seed"] == seed)]
    if lines.empty:
        return {}
    first = lines.iloc[0]
    m = {c: first[c] for c in RECORD_COLUMNS if c in first and pd.notna(first[c])}
    m = {c: (int(v) if c in ("best_epoch", "epochs_run") else v if c == "hardware" else float(v)) for c, v in m.items()}
    return {"metrics": {**m, "record": "runs.csv"}, "history": None}


def _restore_task(task: tuple, dataset_: str, profile: str, records: dict) -> dict:
    _, name, seed = task
    return restore_run(name, dataset_, profile, seed, runs_root(), records[task])


def restore(dataset_: str | None = "ml-100k", profile: str = "quick", jobs: int = 2, progress: bool = True,
            seeds: list[int] | None = None) -> dict:
    """Rebuild every kept checkpoint of results/<dataset>-<profile> (of `seeds` and the runs their
    rows need, default all) as a finished run in the run cache, then every output ensemble of
    runs.csv whose members are there, checking each against runs.csv;
    runs already in the cache are left as they are. A kept run without a line in runs.csv (a run
    the pages read besides the rows, a seed still being trained) is checked only against the
    validation NDCG@10 its record holds, where it holds one ("unlisted" counts them). FmpaperError
    on a mismatch (the mismatching run is removed again). Returns {"set", "restored", "unlisted",
    "present", "root", "seconds"}."""
    t0 = time.perf_counter()
    csv = results_dir(dataset_, profile) / "runs.csv"
    ckpts = checkpoint_dir(dataset_, profile)
    if not csv.is_file() or not ckpts.is_dir():
        raise FmpaperError(f"nothing to restore: {dataset_name(dataset_, profile)}-{profile} has no "
                           f"{'runs.csv' if not csv.is_file() else 'kept checkpoints'} in {csv.parent}")
    kept = kept_checkpoints(dataset_, profile)
    if seeds is not None:
        wanted = set(with_needs((n, s) for s in seeds for n in in_family(None, profile)))
        kept = {(n, s) for n, s in kept if (n, s) in wanted or (n in extra_runs() and s in seeds)}
    expected = pd.read_csv(csv)
    todo, present = [], 0
    for name, seed in sorted(kept, key=lambda t: (t[1], t[0])):
        if is_finished(kept_target(name, dataset_, profile, seed)[0]):
            present += 1
        else:
            todo.append(("train", name, seed))

    tied = 0

    def check(task, metrics):
        nonlocal tied
        _, name, seed = task
        out = _out(task, dataset_, profile, runs_root())
        bad, n_tied = compare(expected, name, seed, metrics, out)
        if bad:
            shutil.rmtree(out, ignore_errors=True)
            raise FmpaperError(f"mismatch, not restored: {bad[0]}")
        tied += n_tied
    records = {t: kept_record(expected, dataset_, profile, t[1], t[2]) for t in todo}
    run_tasks(partial(_restore_task, dataset_=dataset_, profile=profile, records=records), todo,
              {t: set() for t in todo}, jobs, {t: round(100 * EVAL_COST) for t in todo},
              f"restore {dataset_name(dataset_, profile)}-{profile}", "runs", progress, on_done=check)
    # an output ensemble has no weights to keep: recompute it from its restored members (an
    # evaluation, seconds), so the pages find every run of runs.csv
    ensembles = expected[expected["row"].map(lambda n: n in rows() and get_row(n).kind == "ensemble")]
    if seeds is not None:
        ensembles = ensembles[ensembles["seed"].isin(seeds)]
    combine = []
    for name, seed in sorted(set(zip(ensembles["row"], ensembles["seed"].astype(int))), key=lambda t: (t[1], t[0])):
        if is_finished(run_dir(name, dataset_, profile, seed)):
            present += 1
        elif all(is_finished(kept_target(m, dataset_, profile, s)[0]) for m, s in get_row(name).needs(seed)):
            combine.append(("combine", name, seed))
    # as jobs of their own, with the threads every other job has (their record names them)
    if combine:
        run_tasks(partial(_task, dataset_=dataset_, profile=profile, root=str(runs_root())), combine,
                  {t: set() for t in combine}, jobs, {t: round(100 * EVAL_COST) for t in combine},
                  f"ensembles {dataset_name(dataset_, profile)}-{profile}", "runs", progress, on_done=check)
    listed = set(zip(expected["row"], expected["seed"].astype(int)))
    return {"set": f"{dataset_name(dataset_, profile)}-{profile}", "restored": len(todo) + len(combine),
            "unlisted": sum((name, seed) not in listed for _, name, seed in todo), "tied": tied,
            "present": present, "root": str(runs_root()), "seconds": time.perf_counter() - t0}


def restore_summary(result: dict) -> str:
    unlisted = (f" ({result['unlisted']} not in runs.csv: not compared with it)"
                if result.get("unlisted") else "")
    return (f"restored {result['restored']} runs of {result['set']} into {result['root']} "
            f"({result['present']} already there), each matching runs.csv within {TOLERANCE:g}{unlisted}"
            f"{_tied(result)}, in {result['seconds']:.0f} s")
