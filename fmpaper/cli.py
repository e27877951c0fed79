"""Command line: `fmpaper {data,train,evaluate,fisher,merge,rows,row,reproduce,verify} --help`.

Every user error ends in one line `fmpaper: error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import FmpaperError
from .config import PROFILES, VARIANTS, Config, make_config
from .data import load as load_dataset
from .evaluate import PROTOCOLS, evaluate
from .fisher import ESTIMATORS, check_compatible, load_fisher
from .pages.display import seed_list
from .reproduce import reproduce
from .rows import FisherSpec, rows
from .runs import (CURVE_EPOCHS, base_dir, curve_dir, fisher_of, merge_runs, run_curve, run_dir, run_row,
                   start_weights)
from .train import load_run, train
from .verify import restore, restore_summary, summary, verify


def _parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` overrides, typed by the Config field they name."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise FmpaperError(f"--set expects key=value with a Config field as key, got {pair!r}")
        if key == "profile":
            raise FmpaperError("--set profile=...: choose the profile with --profile")
        kind = types[key]
        try:
            if kind == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = {"int": int, "float": float}.get(kind, str)(value)
        except ValueError:
            raise FmpaperError(f"--set {key}: {value!r} is not a valid {kind}") from None
    return out


def cmd_data_stats(a) -> None:
    stats = load_dataset(a.dataset).stats()
    print(json.dumps(stats) if a.json else "\n".join(f"{k}: {v}" for k, v in stats.items()))


def train_overrides(a) -> dict:
    """--set values, then the dedicated flags on top: a flag given on the command line wins over
    --set of the same field; a field set by neither keeps the profile's value (--variant: sasrec)."""
    flags = {"variant": a.variant, "dataset": a.dataset, "seed": a.seed, "epochs": a.epochs, "device": a.device}
    return {**_parse_sets(a.set), **{k: v for k, v in flags.items() if v is not None}}


def cmd_train(a) -> None:
    overrides = train_overrides(a)
    overrides.setdefault("variant", "sasrec")
    cfg = make_config(a.profile, **overrides)
    out = a.out or f"runs/{cfg.variant}-{Path(cfg.dataset).stem}-{cfg.profile}-s{cfg.seed}"
    init = start_weights(cfg, base_dir(cfg)) if cfg.init_from else None     # checked before writing
    metrics = train(cfg, out, progress=not a.quiet, init=init)
    print(json.dumps({"run": str(out), "valid_ndcg@10": metrics["valid_ndcg@10"], "test": metrics["test"]}, indent=2))


def cmd_evaluate(a) -> None:
    run = load_run(a.run_dir)
    m = evaluate(run.model, run.data, a.protocol, seed=run.cfg.seed if a.seed is None else a.seed,
                 mask_history=a.mask_history)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        for mode, vals in m.items():
            print(mode.ljust(7), "  ".join(f"{k} {v:.4f}" for k, v in vals.items()))


def cmd_fisher(a) -> None:
    spec = FisherSpec(a.estimator, a.k, a.batchwise, a.authors)
    out = Path(a.out)
    if out.exists():
        raise FmpaperError(f"{out} already exists; choose another --out")
    _, meta = fisher_of(Path(a.run_dir), spec, progress=not a.quiet, path=out, seed=a.seed)
    print(json.dumps(meta))


def cmd_merge(a) -> None:
    if a.uniform == bool(a.fisher):
        raise FmpaperError("give either --uniform or one --fisher file per run")
    fishers = None
    if a.fisher:
        if len(a.fisher) != len(a.run_dirs):
            raise FmpaperError(f"{len(a.run_dirs)} runs but {len(a.fisher)} Fisher files")
        fishers = []
        for run, path in zip(a.run_dirs, a.fisher):
            f, meta = load_fisher(path)
            member = load_run(run)
            # a Fisher carries its dataset: two datasets with equal item counts have equal shapes
            if meta.get("dataset", member.cfg.dataset) != member.cfg.dataset:
                raise FmpaperError(f"{path} is a Fisher on {meta['dataset']}, but {run} was trained on "
                                   f"{member.cfg.dataset}")
            check_compatible(f, member.model.state_dict())
            fishers.append(f)
    m = merge_runs(a.run_dirs, a.out, fishers, a.lambdas, a.floor, a.finetune_epochs, progress=not a.quiet)
    print(json.dumps({"run": a.out, "test": m["test"]}, indent=2))


def cmd_rows(a) -> None:
    for r in rows().values():
        print(f"{r.name:18s} {r.kind:8s} {r.describe():70s} {'' if r.paper else '(reference)'}")


def cmd_row(a) -> None:
    m = run_row(a.name, a.dataset, a.profile, a.seed, progress=not a.quiet)
    print(json.dumps({"run": str(run_dir(a.name, a.dataset, a.profile, a.seed)), "test": m["test"]}, indent=2))


def cmd_curve(a) -> None:
    run_curve(a.dataset, a.profile, a.seed, progress=not a.quiet)
    d = curve_dir(a.dataset, a.profile, a.seed)
    history = json.loads((d / "history.json").read_text())
    print(json.dumps({"run": str(d), "valid_ndcg@10 by epoch": [round(h["valid_ndcg@10"], 5) for h in history]},
                     indent=2))


def _parse_seeds(text: str):
    """'3' -> 3 (seeds 0..2); '3,4' -> [3, 4]; '3-5' -> [3, 4, 5]."""
    try:
        if text.isdigit():
            return int(text)
        if "-" in text and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            if lo <= hi:
                return list(range(lo, hi + 1))
        elif "," in text:
            return [int(x) for x in text.split(",")]
    except ValueError:
        pass
    raise FmpaperError(f"--seeds takes N (seeds 0..N-1), a list like 3,4 or a range like 3-5; got {text!r}")


def cmd_verify(a) -> None:
    seeds = seed_list(_parse_seeds(a.seeds)) if a.seeds else None
    print(summary(verify(a.dataset, a.profile, jobs=a.jobs, progress=not a.quiet, seeds=seeds)))


def cmd_restore(a) -> None:
    seeds = seed_list(_parse_seeds(a.seeds)) if a.seeds else None
    print(restore_summary(restore(a.dataset, a.profile, jobs=a.jobs, progress=not a.quiet, seeds=seeds)))


def cmd_reproduce(a) -> None:
    reproduce(profile=a.profile, dataset=a.dataset, seeds=_parse_seeds(a.seeds), rows=a.rows,
              book=not a.no_book, jobs=a.jobs, compute=not a.pages_only, threads=a.threads)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors (an unknown choice, a missing argument) as the one line every
    other user error gets, not a usage block; --help still prints the full usage."""

    def error(self, message):
        where = self.prog.removeprefix("fmpaper").strip()
        self.exit(2, f"fmpaper: error: {where + ': ' if where else ''}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fmpaper", description="Fisher-weighted merging of contrastive sequential recommenders: data, training, evaluation, Fisher, merging.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("stats", help="users, items, interactions and training examples after preprocessing")
    s.add_argument("dataset", help="ml-100k, ml-1m or a path to a RecBole .inter file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_data_stats)

    t = sub.add_parser("train", help="train one model (a row 1-5 of the paper's table)")
    t.add_argument("--variant", help=f"training objective: {', '.join(VARIANTS)} (default sasrec)")
    t.add_argument("--dataset", help="ml-100k, ml-1m or a .inter path (default: the profile's)")
    t.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)}")
    t.add_argument("--seed", type=int, help="seeds torch, numpy and every sampler (default 0)")
    t.add_argument("--epochs", type=int, help="override the profile's maximum epochs")
    t.add_argument("--device", help="auto (default), cpu or cuda")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any Config field (repeatable); a dedicated flag given as well wins")
    t.add_argument("--out", help="run directory (default runs/VARIANT-DATASET-PROFILE-sSEED)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="test metrics of a run directory in the three modes")
    e.add_argument("run_dir")
    e.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                   help="as-run: what the authors' code computed, side effects included; paper: their protocol "
                        "without the side effect; corrected: negatives exclude the user's items, no duplicates")
    e.add_argument("--mask-history", action="store_true", help="FULL: exclude the user's earlier items from the ranking")
    e.add_argument("--seed", type=int, help="negative-sampling seed (default: the run's seed)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_evaluate)

    f = sub.add_parser("fisher", help="diagonal Fisher of a run over its validation inputs, saved as safetensors + JSON")
    f.add_argument("run_dir")
    f.add_argument("--estimator", required=True, choices=ESTIMATORS)
    f.add_argument("--k", type=int, help="items per sequence (random, topk, model)")
    f.add_argument("--batchwise", action="store_true", help="the poster's batch-sum approximation")
    f.add_argument("--authors", action="store_true", help="target estimator as the authors' code: logits/10, p^2, no 1/N")
    f.add_argument("--seed", type=int, help="sampling seed (default: the run's seed)")
    f.add_argument("--out", required=True, help="output .safetensors (metadata goes beside it as .json); must not exist")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fisher)

    m = sub.add_parser("merge", help="merge runs (uniform or Fisher-weighted) into a new run directory")
    m.add_argument("run_dirs", nargs="+")
    m.add_argument("--fisher", nargs="+", help="one Fisher file per run, in the same order")
    m.add_argument("--uniform", action="store_true", help="plain parameter mean")
    m.add_argument("--lambdas", type=float, nargs="+", help="model weights lambda_m (default all 1)")
    m.add_argument("--floor", type=float, default=1e-10, help="added to every Fisher entry (default 1e-10)")
    m.add_argument("--finetune-epochs", type=int, default=0, help="CE epochs after merging (the authors used 10)")
    m.add_argument("--out", required=True)
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("rows", help="list the table's rows (fmpaper/rows.toml)")
    r.set_defaults(func=cmd_rows)

    o = sub.add_parser("row", help="compute one row of the table (cached by its configuration)")
    o.add_argument("name")
    o.add_argument("--dataset")
    o.add_argument("--profile", default="quick", choices=tuple(PROFILES))
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(func=cmd_row)

    c = sub.add_parser("curve", help=f"the epoch-budget check: SASRec for {CURVE_EPOCHS} epochs without early "
                                     "stopping, validation NDCG@10 per epoch (cached)")
    c.add_argument("--dataset")
    c.add_argument("--profile", default="quick", choices=tuple(PROFILES))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_curve)

    x = sub.add_parser("reproduce", help="every row through papermill, then the book")
    x.add_argument("--profile", default="quick", choices=tuple(PROFILES))
    x.add_argument("--dataset", help="default: the profile's")
    x.add_argument("--seeds", default="1", help="N: seeds 0..N-1; or a list 3,4 or a range 3-5")
    x.add_argument("--jobs", type=int, default=1,
                   help="rows run at a time, each with threads/jobs threads (2 on a 2-core machine)")
    x.add_argument("--threads", type=int,
                   help="threads for everything it runs, shared by the jobs (default: OMP_NUM_THREADS, "
                        "else every core); 1 beside another training keeps the two from slowing each other")
    x.add_argument("--rows", nargs="+", help="only these rows (default: all)")
    x.add_argument("--no-book", action="store_true", help="skip the book build")
    x.add_argument("--pages-only", action="store_true",
                   help="compute no row: write the tables and pages from the runs finished so far")
    x.set_defaults(func=cmd_reproduce)

    v = sub.add_parser("verify", help="re-evaluate the kept checkpoints and recompute every merge; "
                                      "compare with the committed runs.csv")
    v.add_argument("--dataset", default="ml-100k")
    v.add_argument("--profile", default="quick", choices=tuple(PROFILES))
    v.add_argument("--seeds", help="only these seeds: N (0..N-1), a list 3,4 or a range 3-5 (default: all)")
    v.add_argument("--jobs", type=int, default=2, help="runs recomputed at a time (default 2)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)

    w = sub.add_parser("restore", help="rebuild the kept checkpoints' runs in the run cache (checked against "
                                       "runs.csv), so new rows, pages and seeds build on them without retraining or re-merging")
    w.add_argument("--dataset", default="ml-100k")
    w.add_argument("--profile", default="quick", choices=tuple(PROFILES))
    w.add_argument("--seeds", help="only these seeds and the runs their rows need: N (0..N-1), a list 3,4 or a "
                                   "range 3-5 (default: every kept checkpoint)")
    w.add_argument("--jobs", type=int, default=2, help="runs restored at a time (default 2)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_restore)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FmpaperError as err:
        print(f"fmpaper: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmpaper: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
