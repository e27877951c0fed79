import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmpaper import FmpaperError
from fmpaper.experiments import get_row, rows, run_dir, run_row, train_config

ROOT_ROWS = ["baseline", "cl4srec", "duorec_sup", "duorec_unsup", "duorec_supunsup", "fisher_random_10",
             "fisher_random_30", "fisher_random_50", "fisher_topk_10", "fisher_topk_30", "fisher_topk_50",
             "fisher_model_10", "fisher_model_30", "fisher_model_50", "fisher_target_1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("xruns")


def test_rows_declare_the_paper_table():
    paper = [r.name for r in rows().values() if r.paper]
    assert paper == ROOT_ROWS
    csv = Path(__file__).resolve().parents[2] / "shared" / "paper" / "paper_table.csv"
    if csv.exists():
        assert [line.split(",")[0] for line in csv.read_text().splitlines()[1:]] == ROOT_ROWS
    with pytest.raises(FmpaperError, match="unknown row 'nope'"):
        get_row("nope")


def test_row_settings_reach_the_config():
    cfg = train_config(get_row("cl4srec_infonce"), None, "smoke", 0)
    assert cfg.variant == "cl4srec" and cfg.cl4srec_ce is False
    assert train_config(get_row("cl4srec"), None, "smoke", 0).cl4srec_ce is True
    assert run_dir("cl4srec_infonce", profile="smoke") != run_dir("cl4srec", profile="smoke")


def test_merge_rows_cached_and_consistent(root):
    m1 = run_row("fisher_model_10", profile="smoke", root=root, progress=False)
    d = run_dir("fisher_model_10", profile="smoke", root=root)
    stamp = (d / "metrics.json").stat().st_mtime_ns
    assert run_row("fisher_model_10", profile="smoke", root=root, progress=False) == m1
    assert (d / "metrics.json").stat().st_mtime_ns == stamp                # not recomputed
    assert len(m1["fisher"]) == 3 and all(f["estimator"] == "model" and f["k"] == 10 for f in m1["fisher"])
    members = [run_dir(m, profile="smoke", root=root) for m in get_row("fisher_model_10").members]
    assert m1["members"] == [p.name for p in members]
    # uniform row = the mean of the members' weights
    run_row("uniform", profile="smoke", root=root, progress=False)
    merged = load_file(str(run_dir("uniform", profile="smoke", root=root) / "model.safetensors"))
    states = [load_file(str(p / "model.safetensors")) for p in members]
    for k in merged:
        torch.testing.assert_close(merged[k], sum(s[k] for s in states) / 3)
    ens = run_row("ensemble", profile="smoke", root=root, progress=False)
    assert set(ens["test"]) == {"paper", "corrected"}
    # a different seed is a different run
    assert run_dir("uniform", profile="smoke", seed=1, root=root) != run_dir("uniform", profile="smoke", root=root)


def fm(*args):
    return subprocess.run([sys.executable, "-m", "fmpaper", *map(str, args)], capture_output=True, text=True)


def test_cli_fisher_and_merge(root, tmp_path):
    members = [run_dir(m, profile="smoke", root=root) for m in get_row("uniform").members]
    fishers = []
    for i, m in enumerate(members[:2]):
        out = tmp_path / f"f{i}.safetensors"
        r = fm("fisher", m, "--estimator", "exact", "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["estimator"] == "exact" and out.exists() and out.with_suffix(".json").exists()
        fishers.append(out)
    r = fm("merge", *members[:2], "--fisher", *fishers, "--lambdas", "1", "2", "--out", tmp_path / "merged", "--quiet")
    assert r.returncode == 0, r.stderr
    r = fm("evaluate", tmp_path / "merged", "--json")
    assert r.returncode == 0 and set(json.loads(r.stdout)) == {"full", "uni100", "pop100"}

    def fails(args, message):
        before = set(tmp_path.rglob("*"))
        r = fm(*args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert set(tmp_path.rglob("*")) == before                         # nothing left behind

    fails(["fisher", tmp_path, "--estimator", "exact", "--out", tmp_path / "x.safetensors"], "not a run directory")
    fails(["fisher", members[0], "--estimator", "topk", "--k", "0", "--out", tmp_path / "x.safetensors"], "k")
    fails(["fisher", members[0], "--estimator", "topk", "--k", "100000", "--out", tmp_path / "x.safetensors"], "k")
    fails(["merge", *members[:2], "--fisher", *fishers, "--lambdas", "1", "--out", tmp_path / "m2"], "lambda")
    fails(["merge", *members[:2], "--fisher", *fishers, "--lambdas", "1", "-1", "--out", tmp_path / "m2"], "lambda")
    fails(["merge", *members[:2], "--fisher", fishers[0], "--out", tmp_path / "m2"], "Fisher files")
    # a Fisher with NaN, and one from another architecture
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(str(fishers[0]))
    t[next(iter(t))][..., 0] = float("nan")
    save_file(t, str(bad / "nan.safetensors"))
    (bad / "nan.json").write_text(fishers[0].with_suffix(".json").read_text())
    fails(["merge", *members[:2], "--fisher", bad / "nan.safetensors", fishers[1], "--out", tmp_path / "m2"], "NaN")
    small = {k: v[..., :1].contiguous() for k, v in load_file(str(fishers[0])).items()}
    save_file(small, str(bad / "small.safetensors"))
    (bad / "small.json").write_text(fishers[0].with_suffix(".json").read_text())
    r = fm("merge", *members[:2], "--fisher", bad / "small.safetensors", fishers[1], "--out", tmp_path / "m2")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "m2").exists()


def test_merge_then_finetune(root, tmp_path):
    from fmpaper.experiments import merge_runs
    members = [run_dir(m, profile="smoke", root=root) for m in get_row("uniform").members]
    m = merge_runs(members, tmp_path / "ft", finetune_epochs=1, progress=False)
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert m["finetune"] == {"epochs": 1, "objective": "sasrec (CE)"} and m["method"] == "uniform"
    assert cfg["variant"] == "sasrec" and cfg["epochs"] == 1 and m["epochs_run"] == 1
    with pytest.raises(FmpaperError, match="already holds"):
        merge_runs(members, tmp_path / "ft", progress=False)
