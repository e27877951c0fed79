"""Training speed of fmpaper's SASRec against a straightforward reference, in one run.

Measures training examples/s (forward, backward and Adam step, paper configuration, batch 256,
real ML-100K batches) for the reference and for each lever added in turn, then for every
variant's objective relative to the baseline's; optionally (--curve) trains one epoch with
and without length-grouped batches to show the loss curve is unaffected.
Usage: python benchmarks/bench_train.py [--steps 20] [--curve] [--json out.json]
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


def timed(step, batches_, warmup=3):
    for ex in batches_[:warmup]:
        step(ex)
    t0 = time.perf_counter()
    n = 0
    for ex in batches_[warmup:]:
        step(ex)
        n += len(ex)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    ap.add_argument("--curve", action="store_true", help="also train one epoch with/without length grouping")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = make_config("quick")
    data = load("ml-100k")
    obj = Objective(cfg, data)
    n = len(obj.targets)
    ex_len = (obj.targets - data.offsets[obj.users]).clamp(max=cfg.max_len)
    gen = torch.Generator().manual_seed(0)
    random_b = batches(n, cfg.batch_size, gen)[: args.steps + 3]
    grouped_b = batches(n, cfg.batch_size, gen, ex_len)[: args.steps + 3]

    def make_step(model, loss_fn):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        model.train()

        def step(ex):
            loss = loss_fn(model, ex)
            opt.zero_grad()
            loss.backward()
            opt.step()
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

    rows = []
    ref = timed(make_step(ReferenceSASRec(data.n_items, cfg), lambda m, ex: m.loss(*obj.batch(ex))), random_b)
    rows.append(("reference: nn.TransformerEncoder, full mask", ref))
    rows.append(("+ scaled_dot_product_attention blocks", timed(make_step(SASRec(data.n_items, cfg), ce_all_positions), random_b)))
    rows.append(("+ last block only at the read position", timed(make_step(SASRec(data.n_items, cfg), ce_last), random_b)))
    rows.append(("+ trim padding (random batches)", timed(make_step(SASRec(data.n_items, cfg), ce_trim), random_b)))
    rows.append(("+ trim padding (length-grouped batches) = fmpaper", timed(make_step(SASRec(data.n_items, cfg), ce_trim), grouped_b)))
    compiled = SASRec(data.n_items, cfg)
    try:
        cstep = make_step(compiled, torch.compile(ce_trim, dynamic=True))
        rows.append(("+ torch.compile", timed(cstep, grouped_b, warmup=5)))
    except Exception as e:  # no compiler on this machine
        print(f"torch.compile skipped: {str(e).splitlines()[0]}")
    fm = rows[4][1]
    print(f"\n| configuration | examples/s | x reference | s per ML-100K epoch ({n} examples) |\n|---|---|---|---|")
    for name, eps in rows:
        print(f"| {name} | {eps:.0f} | {eps / ref:.2f} | {n / eps:.1f} |")

    variants = []
    for v in VARIANTS:
        vcfg = make_config("quick", variant=v)
        vobj = Objective(vcfg, data)
        g = torch.Generator().manual_seed(1)
        eps = timed(make_step(SASRec(data.n_items, vcfg), lambda m, ex: vobj(m, ex, g)["loss"]), grouped_b)
        variants.append((v, eps))
    base = variants[0][1]
    print("\n| variant | examples/s | step cost x sasrec |\n|---|---|---|")
    for v, eps in variants:
        print(f"| {v} | {eps:.0f} | {base / eps:.2f} |")

    curve = {}
    if args.curve:
        for name, grouped in (("random", False), ("grouped", True)):
            torch.manual_seed(0)
            model = SASRec(data.n_items, cfg)
            losses = []
            step = make_step(model, ce_trim)
            g = torch.Generator().manual_seed(0)
            for ex in batches(n, cfg.batch_size, g, ex_len if grouped else None):
                seq, lengths, target = obj.batch(ex)
                loss = F.cross_entropy(model.logits(model.encode(trim(seq, lengths), lengths)), target - 1)
                losses.append(float(loss))
                step(ex)
            curve[name] = losses
        k = 25
        print("\n| steps | loss, random batches | loss, length-grouped |\n|---|---|---|")
        for i in range(0, len(curve["random"]), k * 3):
            r = sum(curve["random"][i:i + k]) / len(curve["random"][i:i + k])
            gr = sum(curve["grouped"][i:i + k]) / len(curve["grouped"][i:i + k])
            print(f"| {i}-{i + k} | {r:.3f} | {gr:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "levers": rows,
                                               "variants": variants, "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
