"""Cost and accuracy of every Fisher estimator against the exact Fisher, in one run.

On random SASRecs of the paper's architecture (hidden 64, 2 layers, 2 heads, inner 256,
max_len 50) with ML-100K and ML-1M item counts (1349, 3416), whose item embeddings are shaped
so that the top-10/30/50 items hold about the poster's 38.1/56.9/65.8% of the mass, and on random
sequences of realistic lengths (popularity-skewed items, no repeats), in float32, it times
target, random/topk/model at k = 10/30/50 (per-example in closed form, per-example with
explicit autograd gradients -- the same numbers, the old way --, and batch-wise) and exact on all
sequences, and bruteforce on a subset (then per sequence). Errors are against exact on the
same sequences: max |F - F_exact| / max |F_exact| and ||F - F_exact|| / ||F_exact|| over all
parameters together. Prints a markdown table.
Usage: python benchmarks/bench_fisher.py [--quick] [--sequences 128] [--brute 8] [--json out.json]
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmpaper.config import Config  # noqa: E402
from fmpaper.fisher import compute_fisher, probability_mass_topk  # noqa: E402
from fmpaper.model import SASRec  # noqa: E402

SHAPES = (("ML-100K", 1349), ("ML-1M", 3416))
POSTER_MASS = {10: 0.381, 30: 0.569, 50: 0.658}  # share of p held by the top-k items


def random_sequences(n_items, N, max_len, gen):
    """Right-padded sequences (N, L), lengths, targets: lengths from a long-tailed count of
    interactions per user (most users fill max_len, as in MovieLens), items popularity-skewed."""
    counts = torch.exp(math.log(60) + torch.randn(N, generator=gen)).round() + 5
    lengths = (counts - 2).clamp(1, max_len).long()
    popularity = 1.0 / (torch.arange(n_items, dtype=torch.float64) + 10) ** 0.9
    seq = torch.zeros(N, max_len, dtype=torch.long)
    targets = torch.zeros(N, dtype=torch.long)
    for i in range(N):
        items = torch.multinomial(popularity, int(lengths[i]) + 1, replacement=False, generator=gen) + 1
        seq[i, : lengths[i]] = items[:-1]
        targets[i] = items[-1]
    return seq, lengths, targets


def calibrated_model(n_items, seq, lengths, cfg):
    """Random SASRec shaped like a trained one: item embedding = a * random + b * log-popularity
    along a direction u that the last LayerNorm's bias also points to (a popularity bias, which
    trained recommenders learn); (a, b) from a coarse then a fine grid so that the top-10/30/50
    items hold about the poster's 38.1/56.9/65.8% of the probability mass."""
    model = SASRec(n_items, cfg).eval()
    base = model.item_emb.weight.detach().clone()
    u = torch.randn(cfg.hidden)
    u /= u.norm()
    logpop = -torch.log(torch.arange(n_items, dtype=torch.float32) + 10)  # the sequences' Zipf law
    logpop -= logpop.mean()

    def shape(log_a, log_b):
        with torch.no_grad():
            w = base * math.exp(log_a)
            w[1:n_items + 1] += math.exp(log_b) * logpop[:, None] * u
            model.item_emb.weight.copy_(w)
            model.blocks[-1].ln2.bias.copy_(3.0 * u)
        mass = probability_mass_topk(model, seq, lengths, ks=(10, 30, 50))
        return sum((mass[k] - POSTER_MASS[k]) ** 2 for k in mass)

    coarse = torch.arange(0, 4, 0.25).tolist()
    best = min((shape(a, b), a, b) for a in coarse for b in (x - 4 for x in coarse))
    best = min((shape(a, b), a, b) for a in torch.arange(best[1] - 0.2, best[1] + 0.21, 0.05).tolist()
               for b in torch.arange(best[2] - 0.2, best[2] + 0.21, 0.05).tolist())
    shape(best[1], best[2])
    return model


def errors(f, ref):
    a = torch.cat([t.flatten().double() for t in f.values()])
    b = torch.cat([ref[n].flatten().double() for n in f])
    return float((a - b).abs().max() / b.abs().max()), float((a - b).norm() / b.norm())


def timed(model, seq, lengths, targets, estimator, **kw):
    t0 = time.perf_counter()
    f = compute_fisher(model, seq, lengths, targets, estimator, progress=False, **kw)
    return f, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run: 1/10 of the items, 16 sequences, k=10")
    ap.add_argument("--sequences", type=int, default=128, help="sequences for every estimator")
    ap.add_argument("--brute", type=int, default=8, help="sequences for bruteforce (timed per sequence)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch of the batch-wise formula")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = (10,) if args.quick else (10, 30, 50)
    N = 16 if args.quick else args.sequences
    n_brute = 2 if args.quick else args.brute
    cfg = Config()  # paper architecture; dropout is off in eval mode
    rows, summary = [], []
    for name, n_items in SHAPES:
        if args.quick:
            n_items //= 10
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        seq, lengths, targets = random_sequences(n_items, N, cfg.max_len, gen)
        model = calibrated_model(n_items, seq, lengths, cfg).to(args.device)
        mass = probability_mass_topk(model, seq, lengths, ks=tuple(k for k in (10, 30, 50) if k <= n_items))
        for est, kw in (("exact", {}), ("topk", dict(k=2)), ("topk", dict(k=2, batchwise=True))):  # warm-up
            compute_fisher(model, seq[:2], lengths[:2], targets[:2], est, progress=False, **kw)

        exact, exact_sec = timed(model, seq, lengths, targets, "exact")
        per_k = 1000 / N
        rows.append(dict(dataset=name, estimator="exact", k="", mode="", s_per_1000=exact_sec * per_k,
                         max_rel=0.0, l2_rel=0.0))
        modes = {"per-example": {}, "per-example autograd": dict(gradients="autograd"),
                 "batch-wise": dict(batchwise=True)}
        runs = [("target", None, m) for m in modes]
        runs += [(e, k, m) for e in ("random", "topk", "model") for k in ks for m in modes]
        for est, k, mode in runs:
            f, sec = timed(model, seq, lengths, targets, est, k=k, batch_size=args.batch_size, **modes[mode])
            mx, l2 = errors(f, exact)
            rows.append(dict(dataset=name, estimator=est, k=k or "", mode=mode,
                             s_per_1000=sec * per_k, max_rel=mx, l2_rel=l2))
            print(f"{name} {est} k={k} {mode}: {sec:.1f}s", file=sys.stderr)

        # bruteforce against exact on the same few sequences; time ratio per sequence
        sub = slice(0, n_brute)
        ex_sub, _ = timed(model, seq[sub], lengths[sub], targets[sub], "exact")
        bf, sec_bf = timed(model, seq[sub], lengths[sub], targets[sub], "bruteforce")
        mx, l2 = errors(bf, ex_sub)
        exact_per_seq = exact_sec / N
        rows.append(dict(dataset=name, estimator="bruteforce", k="", mode=f"{n_brute} seqs",
                         s_per_1000=sec_bf / n_brute * 1000, max_rel=mx, l2_rel=l2))
        summary.append(dict(dataset=name, n_items=n_items, sequences=N, top_mass=mass,
                            bruteforce_over_exact=(sec_bf / n_brute) / exact_per_seq,
                            exact_vs_bruteforce_max_rel=mx, exact_vs_bruteforce_l2_rel=l2))
        print(f"{name} bruteforce: {sec_bf:.1f}s for {n_brute} sequences", file=sys.stderr)

    print(f"\nFisher estimators, float32, {torch.get_num_threads()} CPU thread(s) on {args.device}, "
          f"{N} sequences, batch-wise batch {args.batch_size}; errors against exact\n")
    print("| dataset | estimator | k | mode | s / 1000 seq | max abs err / max | rel L2 err |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['estimator']} | {r['k']} | {r['mode']} | {r['s_per_1000']:.1f} "
              f"| {r['max_rel']:.2e} | {r['l2_rel']:.2e} |")
    print()
    for s in summary:
        mass = ", ".join(f"top-{k} {100 * v:.1f}%" for k, v in s["top_mass"].items())
        print(f"- {s['dataset']} ({s['n_items']} items): bruteforce / exact time = "
              f"{s['bruteforce_over_exact']:.0f}x; exact vs bruteforce: "
              f"max rel {s['exact_vs_bruteforce_max_rel']:.1e}, L2 rel {s['exact_vs_bruteforce_l2_rel']:.1e}; "
              f"probability mass {mass}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, summary=summary, threads=torch.get_num_threads(),
                                                   device=args.device, quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
