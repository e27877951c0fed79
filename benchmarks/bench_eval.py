"""Cost of evaluating one model under the three protocols, against the scoring it cannot avoid.

One SASRec of the paper's architecture (random weights: the cost does not depend on them) on a
real dataset (default ML-1M: 6,040 test users, 3,416 items). It times, in one run:

- scoring: every test user's scores over all items (`evaluate.scores`), the floor of any protocol;
- `evaluate.test_report`: the three protocols (as-run, paper, corrected), FULL, RANDOM and
  POPULAR each, i.e. what every run pays once after training;
- the early-stopping criterion `valid_ndcg10`, paid once per epoch.

Each timing is the best of --repeats. Prints a markdown table (seconds, and ratio to scoring).
Usage: python benchmarks/bench_eval.py [--dataset ml-1m] [--threads 1] [--json out.json]
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fmpaper.config import make_config  # noqa: E402
from fmpaper.data import load  # noqa: E402
from fmpaper.evaluate import scores, test_report, valid_ndcg10  # noqa: E402
from fmpaper.model import SASRec  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = make_config("quick", dataset=a.dataset)
    data = load(cfg.dataset, cfg.max_len, cfg.min_count)
    torch.manual_seed(0)
    model = SASRec(data.n_items, cfg).eval()
    with torch.no_grad():
        floor = best_of(lambda: scores(model, data, "test"), a.repeats)
        rows = [("scoring (all users, all items)", floor),
                ("test_report: as-run, paper, corrected", best_of(lambda: test_report(model, data, seed=0), a.repeats)),
                ("valid_ndcg10 (once per epoch)", best_of(lambda: valid_ndcg10(model, data), a.repeats))]
    users = len(data.eval_targets("test"))
    print(f"{a.dataset}: {users} users, {data.n_items} items; {a.threads} thread(s), "
          f"{platform.machine()}, torch {torch.__version__}\n")
    print("| what | seconds | x scoring |\n|---|---|---|")
    for what, s in rows:
        print(f"| {what} | {s:.2f} | {s / floor:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "dataset": a.dataset, "users": users, "items": data.n_items, "threads": a.threads,
            "machine": platform.machine(), "torch": torch.__version__,
            "rows": [{"what": w, "seconds": s, "ratio_to_scoring": s / floor} for w, s in rows]}, indent=1))


if __name__ == "__main__":
    main()
