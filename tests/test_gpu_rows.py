"""benchmarks/gpu_rows.sh, the GPU runner of the trained rows, on the CPU with the smoke profile."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from fmpaper.rows import trained

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_rows_trains_every_trained_row_and_packs_the_run_folders(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, THREADS="1")
    env.pop("FMPAPER_RUNS", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_rows.sh"), "smoke", "ml-100k", "0", str(out), "300"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(name.rsplit("-", 1)[0] for name in summary) == sorted(trained())
    assert all(s["finished"] and s["epochs"] == 1 and len(s["seconds_per_epoch"]) == 1 for s in summary.values())
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    # laid out as the run cache: <dataset>/<profile>/s<seed>/<row>-<hash>/metrics.json
    for run in summary:
        assert f"./ml-100k/smoke/s0/{run}/metrics.json" in names


def test_gpu_rows_needs_its_arguments():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_rows.sh"), "smoke"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage:")
