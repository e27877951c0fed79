"""Command line: `fmpaper {data,train,evaluate,fisher,merge,reproduce} --help`.

Every user error ends in one line `fmpaper: error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import FmpaperError
from .config import PROFILES, VARIANTS, Config, make_config


def _parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` overrides, typed by the Config field they name."""
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise FmpaperError(f"--set expects key=value with a Config field as key, got {pair!r}")
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
    from .data import load
    stats = load(a.dataset).stats()
    print(json.dumps(stats) if a.json else "\n".join(f"{k}: {v}" for k, v in stats.items()))


def cmd_train(a) -> None:
    from .train import train
    cfg = make_config(a.profile, variant=a.variant, dataset=a.dataset, seed=a.seed, epochs=a.epochs,
                      device=a.device, **_parse_sets(a.set))
    out = a.out or f"runs/{cfg.variant}-{cfg.dataset}-{cfg.profile}-s{cfg.seed}"
    metrics = train(cfg, out, progress=not a.quiet)
    print(json.dumps({"run": str(out), "valid_ndcg@10": metrics["valid_ndcg@10"], "test": metrics["test"]}, indent=2))


def cmd_evaluate(a) -> None:
    from .evaluate import evaluate
    from .train import load_run
    run = load_run(a.run_dir)
    m = evaluate(run.model, run.data, a.protocol, seed=run.cfg.seed if a.seed is None else a.seed,
                 mask_history=a.mask_history)
    if a.json:
        print(json.dumps(m, indent=2))
    else:
        for mode, vals in m.items():
            print(mode.ljust(7), "  ".join(f"{k} {v:.4f}" for k, v in vals.items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmpaper", description="Fisher-weighted merging of contrastive sequential recommenders: data, training, evaluation, Fisher, merging.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("stats", help="users, items, interactions and training examples after preprocessing")
    s.add_argument("dataset", help="ml-100k, ml-1m or a path to a RecBole .inter file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_data_stats)

    t = sub.add_parser("train", help="train one model (a row 1-5 of the paper's table)")
    t.add_argument("--variant", default="sasrec", help=f"training objective: {', '.join(VARIANTS)}")
    t.add_argument("--dataset", help="ml-100k, ml-1m or a .inter path (default: the profile's)")
    t.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, help="override the profile's maximum epochs")
    t.add_argument("--device", help="auto (default), cpu or cuda")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any Config field (repeatable)")
    t.add_argument("--out", help="run directory (default runs/VARIANT-DATASET-PROFILE-sSEED)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="test metrics of a run directory in the three modes")
    e.add_argument("run_dir")
    e.add_argument("--protocol", choices=("paper", "corrected"), default="paper",
                   help="paper: as the authors' code; corrected: negatives exclude the user's items, no duplicates")
    e.add_argument("--mask-history", action="store_true", help="FULL: exclude the user's earlier items from the ranking")
    e.add_argument("--seed", type=int, help="negative-sampling seed (default: the run's seed)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_evaluate)
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
