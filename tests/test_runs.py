import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmpaper import FmpaperError, runs
from fmpaper.rows import get_row, rows, with_needs
from fmpaper.runs import PAPER_TABLE, merge_runs, run_dir, run_row, train_config

ROOT_ROWS = ["baseline", "cl4srec", "duorec_sup", "duorec_unsup", "duorec_supunsup", "fisher_random_10",
             "fisher_random_30", "fisher_random_50", "fisher_topk_10", "fisher_topk_30", "fisher_topk_50",
             "fisher_model_10", "fisher_model_30", "fisher_model_50", "fisher_target_1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("xruns")


def test_rows_declare_the_paper_table():
    paper = [r.name for r in rows().values() if r.paper]
    assert paper == ROOT_ROWS
    assert [line.split(",")[0] for line in PAPER_TABLE.read_text().splitlines()[1:]] == ROOT_ROWS
    with pytest.raises(FmpaperError, match="unknown row 'nope'"):
        get_row("nope")


def test_missing_paper_table_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(runs, "PAPER_TABLE", tmp_path / "table.csv")
    with pytest.raises(FmpaperError, match=r"the paper's table .* is missing") as err:
        runs.load_paper_table()
    assert "\n" not in str(err.value)


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
    assert set(ens["test"]) == {"as-run", "paper", "corrected"}
    # a different seed is a different run
    assert run_dir("uniform", profile="smoke", seed=1, root=root) != run_dir("uniform", profile="smoke", root=root)


def test_a_run_in_progress_elsewhere_is_waited_for_not_recomputed(root):
    """A second process asking for a run that another is computing waits on its lock and then
    reads the finished run, instead of training into the same .partial or failing on it."""
    row = get_row("fisher_target_1")
    members = [run_dir(m, profile="smoke", root=root) for m in row.members]
    for m in row.members:
        run_row(m, profile="smoke", root=root, progress=False)
    out = run_dir(row.name, profile="smoke", root=root)
    assert not runs.is_finished(out)
    result = {}
    with runs.exclusive(out):                                             # "another process" holds it
        waiter = threading.Thread(target=lambda: result.update(
            m=run_row(row.name, profile="smoke", root=root, progress=False)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not runs.is_finished(out)           # waiting, writing nothing
        made = runs.combine(row, members, out, progress=False)           # the holder finishes the run
        stamp = (out / "metrics.json").stat().st_mtime_ns
    waiter.join(timeout=60)
    assert not waiter.is_alive() and result["m"]["test"] == made["test"]
    assert (out / "metrics.json").stat().st_mtime_ns == stamp            # read back, not recomputed


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
    seeded = [json.loads(fm("fisher", members[0], "--estimator", "random", "--k", "3", *extra, "--out",
                            tmp_path / f"r{i}.safetensors", "--quiet").stdout)
              for i, extra in enumerate([[], ["--seed", "5"]])]
    assert [m["seed"] for m in seeded] == [0, 5]                             # --seed draws the sampled items
    r0, r1 = (load_file(str(tmp_path / f"r{i}.safetensors")) for i in (0, 1))
    assert r0.keys() == r1.keys() and any(not torch.equal(r0[k], r1[k]) for k in r0)
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
    members = [run_dir(m, profile="smoke", root=root) for m in get_row("uniform").members]
    m = merge_runs(members, tmp_path / "ft", finetune_epochs=1, progress=False)
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert m["finetune"] == {"epochs": 1, "objective": "sasrec (CE)", "lr": 1e-3, "kept": "last epoch"}
    assert m["method"] == "uniform" and m["kept_epoch"] == 1
    assert cfg["variant"] == "sasrec" and cfg["epochs"] == 1 and cfg["select"] == "last" and m["epochs_run"] == 1
    with pytest.raises(FmpaperError, match="already holds"):
        merge_runs(members, tmp_path / "ft", progress=False)


def test_fisher_spec_is_the_one_rule_for_k():
    from fmpaper.rows import FisherSpec
    assert FisherSpec("random", 10).items_per_sequence == 10
    assert FisherSpec("target").items_per_sequence == 1 and FisherSpec("exact").items_per_sequence is None
    for bad, match in [(("target", 1), "takes no k"), (("exact", 5), "takes no k"), (("topk", None), "needs k"),
                       (("model", 0), "needs k"), (("nope", None), "unknown Fisher estimator"),
                       (("exact", None, True), "batchwise"), (("random", 3, False, True), "authors")]:
        with pytest.raises(FmpaperError, match=match):
            FisherSpec(*bad)
    assert get_row("fisher_target_1").fisher == FisherSpec("target")
    assert get_row("fisher_topk_30").fisher == FisherSpec("topk", 30)
    assert get_row("uniform").fisher is None and get_row("baseline").fisher is None


def test_ensemble_scores_are_the_members_mean_probability(tiny_cfg):
    from fmpaper.model import SASRec
    from fmpaper.runs import Ensemble
    models = [SASRec(30, tiny_cfg).eval() for _ in range(3)]
    seq, lengths = torch.tensor([[3, 7, 1, 0], [5, 2, 8, 9]]), torch.tensor([3, 4])
    ens = Ensemble(models).eval()
    scores = ens.logits(ens.encode(seq, lengths))                        # (B, n_items)
    mean_p = torch.stack([m.logits(m.encode(seq, lengths)).softmax(-1) for m in models]).mean(0)
    torch.testing.assert_close(scores.exp(), mean_p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("field,flag,set_value,flag_value", [
    ("variant", "--variant", "cl4srec", "duorec_sup"), ("dataset", "--dataset", "ml-1m", "ml-100k"),
    ("seed", "--seed", "3", "4"), ("epochs", "--epochs", "1", "2"), ("device", "--device", "cuda", "cpu")])
def test_train_flags_and_set_merge(field, flag, set_value, flag_value):
    from fmpaper.cli import build_parser, train_overrides
    parse = build_parser().parse_args
    only_set = train_overrides(parse(["train", "--set", f"{field}={set_value}"]))
    assert str(only_set[field]) == set_value                           # --set alone reaches the config
    both = train_overrides(parse(["train", "--set", f"{field}={set_value}", flag, flag_value]))
    assert str(both[field]) == flag_value                              # the dedicated flag wins


def test_train_cli_with_set_runs(tmp_path):
    r = fm("train", "--profile", "smoke", "--set", "epochs=1", "--set", "hidden=16", "--set", "inner=32",
           "--out", tmp_path / "run", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["epochs"] == 1 and cfg["hidden"] == 16
    r = fm("train", "--profile", "smoke", "--set", "profile=paper", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--profile" in r.stderr and r.stderr.count("\n") == 1


def test_smoke_metrics_match_stored_values(root):
    """Training and evaluation have not drifted: a fresh smoke run of every trained variant and of
    two merges gives the metrics stored in tests/expected/smoke.json (regenerate that file with
    tests/expected/make_smoke.py when a change is meant to alter them)."""
    import importlib.util
    path = Path(__file__).with_name("expected") / "make_smoke.py"
    spec = importlib.util.spec_from_file_location("make_smoke", path)
    make_smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_smoke)
    stored = json.loads(path.with_name("smoke.json").read_text())
    fresh = make_smoke.compute(root)
    assert set(fresh) == set(stored)

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])
    got, want = dict(flat(fresh)), dict(flat(stored))
    assert got.keys() == want.keys()
    drift = {k: (want[k], got[k]) for k in want if abs(got[k] - want[k]) > 1e-6}
    assert not drift, f"{len(drift)} values drifted, e.g. {next(iter(drift.items()))}"


def test_with_needs_follows_members_seeds_and_bases_once():
    # a fine-tuned merge needs its three fine-tuned members, and they the SASRec they start from
    got = with_needs([("ft_fisher_exact", 0), ("ft_uniform", 0)])
    assert got[:1] == [("ft_fisher_exact", 0)] and len(got) == len(set(got))
    assert {("ft_duorec_unsup", 0), ("ft_duorec_sup", 0), ("ft_duorec_supunsup", 0), ("baseline", 0),
            ("ft_uniform", 0)} == set(got) - {("ft_fisher_exact", 0)}
    # expand=False at the trained rows: the base of a fine-tuned copy is not followed
    assert ("baseline", 0) not in with_needs([("ft_fisher_exact", 0)], expand=lambda r: r.kind != "train")
    # a merge of three seeds names its members at the shifted seeds
    assert set(with_needs([("fisher_exact_seeds", 1)])) == {
        ("fisher_exact_seeds", 1), ("duorec_unsup", 1), ("duorec_sup", 2), ("duorec_supunsup", 3)}


def test_epoch_budget_curve_trains_every_epoch_and_is_cached(monkeypatch, tmp_path):
    from fmpaper.pages.data import curve_caption, curve_summary, epoch_curve
    from fmpaper.runs import CURVE_EPOCHS, curve_dir, metrics_of, run_curve
    monkeypatch.setenv("FMPAPER_RUNS", str(tmp_path))
    assert "has not run" in curve_summary(epoch_curve("ml-100k", "smoke")).text
    run_curve("ml-100k", "smoke", progress=False)
    curve = epoch_curve("ml-100k", "smoke")
    # the figure names the machine the curve trained on, as its record says, not the page's
    record = curve_dir("ml-100k", "smoke") / "metrics.json"
    record.write_text(json.dumps({**metrics_of(curve_dir("ml-100k", "smoke")), "hardware": "Some CPU, 1 thread"}))
    assert curve_caption(epoch_curve("ml-100k", "smoke")).endswith("seed 0 · Some CPU, 1 thread")
    # never stopped early, whatever the validation does; the profile's epochs (1) are marked
    assert list(curve["epoch"]) == list(range(1, CURVE_EPOCHS + 1))
    assert curve.attrs["epochs"] == 1 and "after the profile's 1 epoch" in curve_summary(curve).text.lower()
    stamp = (curve_dir("ml-100k", "smoke") / "metrics.json").stat().st_mtime_ns
    run_curve("ml-100k", "smoke", progress=False)  # cached: nothing retrained
    assert (curve_dir("ml-100k", "smoke") / "metrics.json").stat().st_mtime_ns == stamp


def test_finished_by_fixes_the_set_of_runs(tmp_path, monkeypatch):
    # a run that finishes while the pages are executed stays out of them: within finished_by(t),
    # in this process and in the processes it starts, only runs finished by t count
    monkeypatch.delenv(runs.FINISHED_BY, raising=False)
    early, late = tmp_path / "early", tmp_path / "late"
    for d, when in ((early, 1_000.0), (late, 2_000.0)):
        d.mkdir()
        (d / "metrics.json").write_text("{}")
        os.utime(d / "metrics.json", (when, when))
    assert runs.is_finished(early) and runs.is_finished(late)
    probe = [sys.executable, "-c", f"from fmpaper.runs import is_finished; print(is_finished({str(late)!r}))"]
    with runs.finished_by(1_500.0):
        assert runs.is_finished(early) and not runs.is_finished(late)
        assert not runs.is_finished(tmp_path / "never")
        assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "False"
    assert runs.is_finished(late) and runs.FINISHED_BY not in os.environ
