"""`fmpaper verify`: check the book's numbers without retraining.

The repository keeps the weights of every trained row the book shows
(results/<dataset>-<profile>/checkpoints/<row>-s<seed>.safetensors, with the run's config as
.json). `verify` rebuilds those runs in a scratch runs root, re-evaluates each checkpoint under
both protocols, recomputes every merge and ensemble from them (Fishers included), and compares
every test metric and every trained row's validation NDCG@10 with the committed runs.csv.

Tasks run `jobs` at a time, each with cores/jobs threads as `fmpaper reproduce` trains them;
the progress bar counts work in the same units as reproduce's. The first mismatch, a missing
checkpoint or a checkpoint whose config is not its row's ends in one line and exit status 2.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from . import FmpaperError
from .config import Config
from .evaluate import valid_ndcg10
from .model import SASRec
from .reproduce import COMBINE_COST, row_cost
from .rows import get_row
from .runs import (checkpoint_dir, checkpoint_files, dataset, dataset_name, results_dir, run_dir, run_row,
                   train_config)
from .train import finish_run

TOLERANCE = 1e-6
EVAL_COST = 0.02       # one evaluation under both protocols, in reproduce's work units


def _threads(n: int) -> None:
    torch.set_num_threads(n)


def _restore(name: str, dataset_: str, profile: str, seed: int, root: str) -> dict:
    """Rebuild a trained row's run in the scratch root from its kept checkpoint; its metrics."""
    weights, conf = checkpoint_files(dataset_, profile, name, seed)
    if not weights.is_file() or not conf.is_file():
        raise FmpaperError(f"no kept checkpoint for row {name} seed {seed} ({weights.name} in {weights.parent})")
    cfg = Config.from_dict(json.loads(conf.read_text()))
    expected = train_config(get_row(name), dataset_, profile, seed)
    if cfg.identity() != expected.identity():
        diff = sorted(k for k in set(cfg.identity()) | set(expected.identity())
                      if cfg.identity().get(k) != expected.identity().get(k))
        raise FmpaperError(f"checkpoint {conf.name} does not match row {name} seed {seed} "
                           f"(differs in {', '.join(diff)})")
    data = dataset(cfg)
    model = SASRec(data.n_items, cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as e:  # wrong shapes or names
        raise FmpaperError(f"checkpoint {weights.name} does not fit row {name}: {str(e).splitlines()[0]}") from None
    model.eval()
    out = run_dir(name, dataset_, profile, seed, root=Path(root))
    part = out.with_name(out.name + ".partial")
    part.mkdir(parents=True, exist_ok=True)
    metrics = {"valid_ndcg@10": valid_ndcg10(model, data), "restored_from": weights.name}
    return finish_run(part, out, model, data, cfg, metrics)


def _combine(name: str, dataset_: str, profile: str, seed: int, root: str) -> dict:
    return run_row(name, dataset_, profile, seed, root=Path(root), progress=False)


def _task(kind: str, name: str, dataset_: str, profile: str, seed: int, root: str) -> tuple:
    fn = _restore if kind == "train" else _combine
    return name, seed, fn(name, dataset_, profile, seed, root)


def compare(expected: pd.DataFrame, name: str, seed: int, metrics: dict) -> list[str]:
    """Every mismatch (beyond TOLERANCE) between a recomputed run and its runs.csv lines."""
    bad = []
    lines = expected[(expected["row"] == name) & (expected["seed"] == seed)]
    for _, r in lines.iterrows():
        got = metrics["test"][r["protocol"]][r["mode"]][r["metric"]]
        if not abs(got - r["value"]) <= TOLERANCE:
            bad.append(f"{name} seed {seed} {r['protocol']} {r['mode']} {r['metric']}: "
                       f"runs.csv {r['value']:.8f}, recomputed {got:.8f}")
    if get_row(name).kind == "train" and len(lines):
        want = float(lines["valid_ndcg10"].iloc[0])
        if not abs(metrics["valid_ndcg@10"] - want) <= TOLERANCE:
            bad.append(f"{name} seed {seed} validation NDCG@10: runs.csv {want:.8f}, "
                       f"recomputed {metrics['valid_ndcg@10']:.8f}")
    return bad


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
    pairs = expected.drop_duplicates(["row", "seed"])[["row", "kind", "seed"]].itertuples(index=False)
    tasks = [("train" if kind == "train" else "combine", row, int(seed)) for row, kind, seed in pairs]
    for _, row, _ in tasks:
        get_row(row)  # a row runs.csv names must still exist
    # in hundredths of a SASRec training (reproduce's units), as integers
    cost = {t: round(100 * (EVAL_COST if t[0] == "train" else row_cost(t[1]) if get_row(t[1]).fisher
                            else COMBINE_COST / 10)) for t in tasks}
    bar = tqdm(total=sum(cost.values()), desc=f"verify {dataset_name(dataset_, profile)}-{profile}",
               disable=not progress, bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done, checked = set(), 0
    with tempfile.TemporaryDirectory(prefix="fmpaper-verify-") as root, \
            ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_threads,
                                initargs=(threads,)) as pool:
        waiting, running = list(tasks), {}
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    ready = [t for t in waiting if t[0] == "train" or
                             all(("train", m, t[2]) in done for m in get_row(t[1]).members)]
                    if not ready:
                        break
                    waiting.remove(ready[0])
                    t = ready[0]
                    running[pool.submit(_task, t[0], t[1], dataset_, profile, t[2], root)] = t
                if not running:
                    missing = sorted({f"{m} seed {t[2]}" for t in waiting for m in get_row(t[1]).members
                                      if ("train", m, t[2]) not in done})
                    raise FmpaperError(f"runs.csv has merges whose members it does not list: {', '.join(missing)}")
                for fut in wait(running, return_when=FIRST_COMPLETED)[0]:
                    t = running.pop(fut)
                    name, seed, metrics = fut.result()
                    bad = compare(expected, name, seed, metrics)
                    if bad:
                        more = f" (and {len(bad) - 1} more in this run)" if len(bad) > 1 else ""
                        raise FmpaperError(f"mismatch: {bad[0]}{more}")
                    checked += int(((expected["row"] == name) & (expected["seed"] == seed)).sum())
                    done.add(t)
                    bar.set_postfix_str(f"{len(done)}/{len(tasks)} runs")
                    bar.update(cost[t])
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
    bar.close()
    return {"set": f"{dataset_name(dataset_, profile)}-{profile}", "runs": len(tasks), "values": checked,
            "seeds": sorted({t[2] for t in tasks}), "seconds": time.perf_counter() - t0}


def summary(result: dict) -> str:
    return (f"verified {result['runs']} runs of {result['set']} (seeds {', '.join(map(str, result['seeds']))}): "
            f"all {result['values']} values of runs.csv recomputed within {TOLERANCE:g} in {result['seconds']:.0f} s")
