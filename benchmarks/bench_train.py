"""Training speed of fmpaper's SASRec against a straightforward reference, in one run.

Measures training examples/s (forward, backward and Adam step; paper configuration, batch 256,
real batches of ML-100K or of --dataset) of the reference and of each lever added in turn, then
of every variant's objective relative to the baseline's. Time is this process's CPU time (time.process_time),
which other processes on a shared machine barely disturb, unlike wall time; with --threads 1
it equals wall time on an idle machine. Configurations run in interleaved rounds on the same
batches and the best round counts (the ratios are the result; absolute figures depend on the
machine). --curve trains one epoch with random and
with length-grouped batches to show the loss curve is unaffected by grouping.
Usage: python benchmarks/bench_train.py [--rounds 5] [--steps 8] [--threads 1] [--curve] [--json out.json]
       python benchmarks/bench_train.py --dataset ml-1m --variants-only --threads 1   # ML-1M epoch costs
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmpaper.config import VARIANTS, make_config  # noqa: E402
from fmpaper.data import batches, load  # noqa: E402
from fmpaper.model import SASRec, trim  # noqa: E402
from fmpaper.objectives import Objective  # noqa: E402
from reference import ReferenceSASRec  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the fmpaper step")
    ap.add_argument("--curve", action="store_true", help="also train one epoch with/without length grouping")
    ap.add_argument("--dataset", default="ml-100k", help="whose batches to time (default ml-100k)")
    ap.add_argument("--variants-only", action="store_true",
                    help="time only the variants' objectives (not the reference and the levers)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = make_config("quick", dataset=args.dataset)
    data = load(cfg.dataset, cfg.max_len, cfg.min_count)
    obj = Objective(cfg, data)
    n = len(obj.targets)
    ex_len = obj.lengths
    gen = torch.Generator().manual_seed(0)
    random_b = batches(n, cfg.batch_size, gen)
    grouped_b = batches(n, cfg.batch_size, gen, ex_len)

    def make_step(model, loss_fn):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        model.train()

        def step(ex):
            loss = loss_fn(model, ex)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())
        return step

    def ce_all_positions(model, ex):    # fmpaper blocks, every position through every layer
        seq, lengths, target = obj.batch(ex)
        h = model.encode_all(seq)[torch.arange(len(ex)), lengths - 1]
        return F.cross_entropy(model.logits(h), target - 1)

    def ce_last(model, ex):             # last block only at the read position, no trimming
        seq, lengths, target = obj.batch(ex)
        return F.cross_entropy(model.logits(model.encode(seq, lengths)), target - 1)

    def ce_trim(model, ex):
        seq, lengths, target = obj.batch(ex)
        return F.cross_entropy(model.logits(model.encode(trim(seq, lengths), lengths)), target - 1)

    def variant_loss(v):
        vobj, g = Objective(make_config("quick", dataset=args.dataset, variant=v), data), torch.Generator().manual_seed(1)
        return lambda m, ex: vobj(m, ex, g)["loss"]

    new = lambda: SASRec(data.n_items, cfg)  # noqa: E731
    configs = {} if args.variants_only else {  # name -> (step, batches)
        "reference: nn.TransformerEncoder, explicit mask": (make_step(ReferenceSASRec(data.n_items, cfg), lambda m, ex: m.loss(*obj.batch(ex))), random_b),
        "+ own blocks (fused attention without dropout, fast dropout)": (make_step(new(), ce_all_positions), random_b),
        "+ last block only at the read position": (make_step(new(), ce_last), random_b),
        "+ trim padding (random batches)": (make_step(new(), ce_trim), random_b),
        "+ trim padding, length-grouped batches (fmpaper)": (make_step(new(), ce_trim), grouped_b),
    }
    if args.compile:
        configs["+ torch.compile"] = (make_step(new(), torch.compile(ce_trim, dynamic=True)), grouped_b)
    for v in VARIANTS:
        configs[f"variant {v}"] = (make_step(SASRec(data.n_items, make_config("quick", dataset=args.dataset, variant=v)),
                                             variant_loss(v)), grouped_b)

    best = {name: 0.0 for name in configs}
    cursor = 10 * args.threads if args.threads else 10
    for name, (step, bs) in configs.items():       # warm-up: first calls of each shape are slow
        for ex in bs[:10]:
            step(ex)
    for r in range(args.rounds):
        for name, (step, bs) in configs.items():
            chunk = bs[cursor + r * args.steps: cursor + (r + 1) * args.steps]
            t0 = time.process_time()
            for ex in chunk:
                step(ex)
            best[name] = max(best[name], sum(map(len, chunk)) / (time.process_time() - t0))
    base = best["variant sasrec"]
    print(f"{args.dataset}; torch threads: {torch.get_num_threads()}; CPU time; best of {args.rounds} "
          f"interleaved rounds of {args.steps} steps")
    if not args.variants_only:
        ref = best["reference: nn.TransformerEncoder, explicit mask"]
        print(f"\n| configuration | examples/s | x reference | s per epoch ({n} examples) |\n|---|---|---|---|")
        for name, eps in best.items():
            if not name.startswith("variant"):
                print(f"| {name} | {eps:.0f} | {eps / ref:.2f} | {n / eps:.1f} |")
    print(f"\n| variant | examples/s | step cost x sasrec | min per epoch ({n} examples) |\n|---|---|---|---|")
    for name, eps in best.items():
        if name.startswith("variant"):
            print(f"| {name[8:]} | {eps:.0f} | {base / eps:.2f} | {n / eps / 60:.1f} |")

    curve = {}
    if args.curve:
        for name, grouped in (("random", False), ("grouped", True)):
            torch.manual_seed(0)
            step = make_step(new(), ce_trim)
            g = torch.Generator().manual_seed(0)
            curve[name] = [step(ex) for ex in batches(n, cfg.batch_size, g, ex_len if grouped else None)]
        k = 25
        print("\n| steps | mean loss, random batches | mean loss, length-grouped batches |\n|---|---|---|")
        for i in range(0, len(curve["random"]), k * 3):
            r, gr = curve["random"][i:i + k], curve["grouped"][i:i + k]
            print(f"| {i}-{i + len(r)} | {sum(r) / len(r):.3f} | {sum(gr) / len(gr):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": args.dataset, "examples": n,
                                               "threads": torch.get_num_threads(), "examples_per_s": best,
                                               "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
