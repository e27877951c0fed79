"""Write tests/expected/smoke.json: the smoke profile's test metrics of every trained row and two
merges, seed 0, trained afresh in a scratch runs root. Run it when a change to training or
evaluation is intended, and commit the file with that change (`python tests/expected/make_smoke.py`)."""
import json
import sys
import tempfile
from pathlib import Path

from fmpaper.runs import run_row

ROWS = ["baseline", "cl4srec", "cl4srec_infonce", "duorec_sup", "duorec_unsup", "duorec_supunsup",
        "fisher_model_10", "uniform", "cl4srec_as_run", "ft_cl4srec"]


def compute(root) -> dict:
    out = {}
    for name in ROWS:
        m = run_row(name, "ml-100k", "smoke", 0, root=Path(root), progress=False)
        out[name] = {"test": m["test"], **({"valid_ndcg@10": m["valid_ndcg@10"]} if "valid_ndcg@10" in m else {})}
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        values = compute(tmp)
    path = Path(__file__).with_name("smoke.json")
    path.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}", file=sys.stderr)
