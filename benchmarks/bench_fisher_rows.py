"""Wall time of every Fisher the merge rows need, for the three merged models of one set and seed.

The issue-level target: on ML-1M, every Fisher row of the three merged DuoRec models (the exact
Fisher, the target item, random / top-k / model-based sampling at k = 10, 30, 50: 33 Fishers over
6,040 validation sequences) in under 10 minutes on the 2-core machine. This computes them all
again from the finished members in the run cache, `--jobs` processes of `--threads` threads each
(largest first, each process taking the next when it is free), into a scratch folder (the run
cache is not touched), and reports the wall time, the run time per estimator and k, and the
run time summed (what `fisher_seconds` records per merge row).

Usage: python benchmarks/bench_fisher_rows.py --dataset ml-1m --profile quick --seed 0
       [--jobs 2] [--threads 1] [--json out.json]
The members must be finished runs (`fmpaper row duorec_sup ...`, or `fmpaper restore`).
"""
import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmpaper import FmpaperError  # noqa: E402
from fmpaper.config import make_config  # noqa: E402
from fmpaper.rows import fisher_merges, get_row  # noqa: E402
from fmpaper.runs import dataset_name, fisher_of, is_finished, run_dir  # noqa: E402
from fmpaper.train import hardware  # noqa: E402

REFERENCE = "fisher_exact"   # the merge row whose members are "the three merged models"


def specs_and_members(dataset, profile, seed):
    """The distinct Fisher specs of the merge rows that merge REFERENCE's members (same seeds),
    and those members' run folders."""
    ref = get_row(REFERENCE)
    members = ref.needs(seed)
    specs = []
    for name in fisher_merges("scratch"):
        row = get_row(name)
        if row.needs(seed) == members and row.fisher not in specs:
            specs.append(row.fisher)
    dirs = [run_dir(m, dataset, profile, s) for m, s in members]
    missing = [f"{m} seed {s}" for (m, s), d in zip(members, dirs) if not is_finished(d)]
    if missing:
        raise FmpaperError(f"members not in the run cache: {', '.join(missing)} "
                           f"(train them with `fmpaper row`, or `fmpaper restore`)")
    return specs, dirs


def cost(spec, hidden: int) -> int:
    """Backward passes per batch (the exact Fisher: one per hidden dimension d): what orders the
    tasks, largest first."""
    return hidden if spec.estimator == "exact" else (spec.k or 1)


def _init(threads):
    torch.set_num_threads(threads)


def _one(task):
    member, spec, out = task
    t0 = time.perf_counter()
    _, meta = fisher_of(Path(member), spec, progress=False, path=Path(out))
    return {"model": Path(member).name, "estimator": spec.estimator, "k": spec.k,
            "seconds": meta["seconds"], "task_seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="processes (default 2: the two cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.jobs < 1 or a.threads < 1:
        sys.exit(f"error: --jobs and --threads must be >= 1, got {a.jobs} and {a.threads}")
    try:
        specs, dirs = specs_and_members(a.dataset, a.profile, a.seed)
    except FmpaperError as e:
        sys.exit(f"error: {e}")
    hidden = make_config(a.profile, dataset=a.dataset).hidden
    with tempfile.TemporaryDirectory() as tmp:
        tasks = sorted(((str(d), s, str(Path(tmp) / f"{i}-{j}.safetensors"))
                        for i, d in enumerate(dirs) for j, s in enumerate(specs)),
                       key=lambda t: -cost(t[1], hidden))
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(a.jobs, initializer=_init, initargs=(a.threads,)) as pool:
            done = list(pool.imap_unordered(_one, tasks))
        wall = time.perf_counter() - t0
    by = {}
    for r in done:
        key = r["estimator"] if r["k"] is None else f"{r['estimator']} k={r['k']}"
        by[key] = by.get(key, 0.0) + r["seconds"]
    total = sum(r["seconds"] for r in done)
    where = hardware().rsplit(",", 1)[0]
    print(f"{len(done)} Fishers of {len(dirs)} models ({dataset_name(a.dataset, a.profile)}, profile {a.profile}, "
          f"seed {a.seed}) on {where}, {a.jobs} process(es) x {a.threads} thread(s): wall {wall:.0f} s "
          f"({wall / 60:.1f} min), run time summed {total:.0f} s")
    print("| estimator | seconds, three models |")
    print("|---|---|")
    for key, s in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {s:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "dataset": dataset_name(a.dataset, a.profile), "profile": a.profile, "seed": a.seed,
            "jobs": a.jobs, "threads": a.threads, "hardware": where, "torch": torch.__version__,
            "wall_seconds": wall, "run_seconds": total, "per_estimator_seconds": by, "fishers": done},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
