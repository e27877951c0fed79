import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fmpaper import FmpaperError
from fmpaper.config import VARIANTS, make_config
from fmpaper.train import load_run, train

from conftest import train_killed_after_first_epoch


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, smoke_data):
    """One smoke epoch of each of the five table models."""
    root = tmp_path_factory.mktemp("runs")
    for v in VARIANTS:
        train(make_config("smoke", variant=v), root / v, progress=False, data=smoke_data)
    return root


@pytest.mark.parametrize("variant", VARIANTS)
def test_smoke_epoch(smoke_runs, variant):
    run = smoke_runs / variant
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert metrics["epochs_run"] == 1 and len(history) == 1
    assert history[0]["loss"] > 0 and ("cl" in history[0]) == (variant != "sasrec")
    for protocol in ("as-run", "paper", "corrected"):
        for mode in ("full", "uni100", "pop100"):
            m = metrics["test"][protocol][mode]
            assert 0 <= m["ndcg@10"] <= m["hr@10"] <= m["hr@20"] <= 1
    assert not (run.parent / (variant + ".partial")).exists()


def test_all_checkpoints_mergeable(smoke_runs):
    shapes = [{k: tuple(v.shape) for k, v in load_file(str(smoke_runs / v / "model.safetensors")).items()}
              for v in VARIANTS]
    assert all(s == shapes[0] for s in shapes)


def test_load_run_refuses_bad_checkpoints(smoke_runs, tmp_path, smoke_data):
    with pytest.raises(FmpaperError, match="not a run directory"):
        load_run(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((smoke_runs / "sasrec" / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FmpaperError, match="unreadable checkpoint"):
        load_run(bad, data=smoke_data)
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((smoke_runs / "sasrec" / "config.json").read_text())
    cfg["hidden"] = 32
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes((smoke_runs / "sasrec" / "model.safetensors").read_bytes())
    with pytest.raises(FmpaperError, match="does not match"):
        load_run(other, data=smoke_data)


def test_refuses_to_overwrite(smoke_runs, smoke_data):
    with pytest.raises(FmpaperError, match="already holds"):
        train(make_config("smoke"), smoke_runs / "sasrec", progress=False, data=smoke_data)


def test_resume_after_kill_matches_uninterrupted(tmp_path, smoke_data):
    cfg = make_config("smoke", epochs=2, patience=2, variant="duorec_supunsup")
    train(cfg, tmp_path / "straight", progress=False, data=smoke_data)
    train_killed_after_first_epoch(cfg, tmp_path / "resumed", smoke_data)
    assert (tmp_path / "resumed.partial" / "state.json").exists() and not (tmp_path / "resumed").exists()
    train(cfg, tmp_path / "resumed", progress=False, data=smoke_data)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())["test"]
    mb = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["test"]
    assert ma == mb


def test_kill_9_then_rerun_matches_uninterrupted(tmp_path):
    """A real kill -9 at a random instant of the second epoch; the rerun resumes and ends equal."""
    import os
    import signal
    import time
    args = ["--profile", "smoke", "--variant", "cl4srec", "--epochs", "3", "--set", "patience=3", "--quiet"]
    # both runs in a fresh process with one thread: the same reduction order whatever the test
    # process did to its own torch settings before
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    fm = [sys.executable, "-m", "fmpaper", "train", *args, "--out"]
    straight = subprocess.run([*fm, str(tmp_path / "straight")], capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr
    cmd = [*fm, str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / "killed.partial" / "state.json"
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["epoch"] >= 1) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if (tmp_path / "killed").exists():
        pytest.skip("the run finished before it could be killed")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not (tmp_path / "killed.partial").exists()


def test_cli_train_errors_leave_nothing(tmp_path):
    for args, msg in ((["--variant", "nope"], "unknown variant"), (["--profile", "huge"], "unknown profile"),
                      (["--set", "cl_temperature=0"], "cl_temperature"), (["--set", "mask_gamma=1.5"], "mask_gamma"),
                      (["--set", "cl_weight=-1"], "cl_weight")):
        r = subprocess.run([sys.executable, "-m", "fmpaper", "train", "--out", str(tmp_path / "x"), *args],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_hardware_names_the_processor_and_threads(smoke_runs):
    """A run records the processor's model name (model-based Fisher draws differ between
    processors) and its thread count."""
    from pathlib import Path

    from fmpaper.train import hardware, processor
    names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
             if l.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    if torch.cuda.is_available():
        pytest.skip("on a GPU the run records the GPU's name")
    if names:
        assert processor() == names[0]
    assert processor()
    n = torch.get_num_threads()
    assert hardware() == f"{processor()}, {n} thread{'' if n == 1 else 's'}"
    recorded = json.loads((smoke_runs / "sasrec" / "metrics.json").read_text())["hardware"]
    assert recorded.startswith(processor() + ", ")
