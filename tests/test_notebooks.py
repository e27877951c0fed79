"""The notebook templates, executed with papermill on the smoke profile.

Smoke runs are cached by the hash of their configuration under the runs root ($FMPAPER_RUNS,
else ~/.cache/fmpaper/runs), so the session fixture computes the table once (a few minutes the
first time on two cores) and every later session only reads it back. Files the notebooks write
(tables, figures, executed notebooks) go to a temporary $FMPAPER_RESULTS.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fmpaper import FmpaperError, reproduce, stats, verify
from fmpaper.evaluate import PROTOCOLS, metrics_from_ranks
from fmpaper.pages import anomalies, figures, protocols, results
from fmpaper.rows import get_row, labels, rows
from fmpaper.runs import (CURVE_NAME, RANDOM_BATCHES, checkpoint_dir, checkpoint_files, checkpoint_record, collect,
                          curve_dir, exclusive, extra_runs, is_finished, keep_checkpoints, load_paper_table, run_curve,
                          run_dir, run_row, training_record, user_ndcg)
from fmpaper.stats import AS_LONG, ORACLE, UNIFORM, paired_tests
from fmpaper.train import partial_dir

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "notebooks").glob("*.ipynb"))
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
SMOKE = {"dataset": "ml-100k", "profile": "smoke"}


@pytest.fixture(scope="session")
def results_env(tmp_path_factory):
    """A temporary $FMPAPER_RESULTS, inherited by the kernels papermill and nbval start."""
    path = tmp_path_factory.mktemp("results")
    old = os.environ.get("FMPAPER_RESULTS")
    os.environ["FMPAPER_RESULTS"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FMPAPER_RESULTS", None)
    else:
        os.environ["FMPAPER_RESULTS"] = old


@pytest.fixture(scope="session")
def smoke_table():
    """Every row of the table on the smoke profile, seed 0 (cached across sessions)."""
    for name in rows():
        run_row(name, "ml-100k", "smoke", 0, progress=False)
    return {name: run_dir(name, "ml-100k", "smoke", 0) for name in rows()}


@pytest.fixture(scope="session")
def pages(tmp_path_factory, smoke_table, results_env):
    """The book's page notebooks executed on the smoke profile into a temporary book folder."""
    book = tmp_path_factory.mktemp("book")
    return {p.stem: p for p in reproduce.run_pages("smoke", "ml-100k", [0], book_dir=book)}


def outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def record_of(path) -> dict:
    found = [o["data"]["application/json"] for o in outputs(path) if "application/json" in o.get("data", {})]
    assert len(found) == 1, f"{path.name}: expected one JSON record, found {len(found)}"
    return found[0]


def assert_close_metrics(got: dict, want: dict, tol: float = 1e-9):
    assert set(got) == set(want)
    for protocol in want:
        for mode in want[protocol]:
            for metric, v in want[protocol][mode].items():
                assert abs(got[protocol][mode][metric] - v) <= tol, (protocol, mode, metric)


# ----------------------------------------------------------------------------- templates

@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_links_resolve_in_every_book_folder(path):
    # a page may land in book/ or in book/<dataset>-<profile>/: a relative link may only name a
    # page written beside it; other chapters need {doc}`text </chapter>`
    for cell in nbformat.read(path, 4).cells:
        if cell.cell_type != "markdown":
            continue
        for target in re.findall(r"\]\(([^)#\s]+)", cell.source):
            if "://" not in target:
                assert Path(target).suffix == ".ipynb" and Path(target).stem in reproduce.PAGES, \
                    f"{path.name}: link to {target} breaks in a subfolder of book/"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_has_one_parameters_cell(path):
    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert 'profile = "smoke"' in tagged[0].source and 'dataset = "ml-100k"' in tagged[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "templates are stored unexecuted"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


# ----------------------------------------------------------------------------- row notebooks

@pytest.mark.parametrize("row,template", [("baseline", "train_row"), ("fisher_topk_10", "merge_row"),
                                          ("ensemble", "merge_row")])
def test_row_notebook_metrics_match_run(row, template, tmp_path, smoke_table, results_env):
    out = reproduce.execute(reproduce.template(template), tmp_path / f"{row}.ipynb",
                            dict(SMOKE, row=row, seed=0), f"row {row}")
    rec = record_of(out)
    run = smoke_table[row]
    metrics = json.loads((run / "metrics.json").read_text())
    assert rec["row"] == row and rec["profile"] == "smoke" and rec["seed"] == 0
    assert rec["hardware"] == metrics["hardware"]
    assert_close_metrics(rec["test"], metrics["test"])
    # and both agree with the metrics recomputed from the stored per-user ranks
    ranks = load_file(str(run / "ranks.safetensors"))
    for key, r in ranks.items():
        protocol, mode = key.split(".")
        for metric, v in metrics_from_ranks(r).items():
            assert abs(rec["test"][protocol][mode][metric] - v) <= 1e-9, key
    # the notebook labels its output: dataset, profile, seed, hardware, wall time
    text = "\n".join(o.get("data", {}).get("text/plain", "") for o in outputs(out))
    for label in ("ml-100k", "profile smoke", "seeds 0", metrics["hardware"], "Notebook executed"):
        assert label in text


def test_unknown_row_fails_clearly(tmp_path, results_env):
    with pytest.raises(FmpaperError) as err:
        reproduce.execute(reproduce.template("train_row"), tmp_path / "x.ipynb",
                          dict(SMOKE, row="no_such_row", seed=0), "row no_such_row")
    msg = str(err.value)
    assert "\n" not in msg
    assert "row no_such_row" in msg and "cell" in msg and "FmpaperError" in msg
    assert "unknown row 'no_such_row'" in msg and "baseline" in msg  # the valid rows are listed


def test_wrong_parameter_type_names_row_and_parameter(tmp_path, results_env):
    with pytest.raises(FmpaperError) as err:
        reproduce.execute(reproduce.template("train_row"), tmp_path / "x.ipynb",
                          dict(SMOKE, row="baseline", seed="zero"), "row baseline")
    msg = str(err.value)
    assert "parameter seed (row 'baseline')" in msg and "'zero'" in msg


def test_row_of_the_wrong_kind_is_refused(tmp_path, results_env):
    with pytest.raises(FmpaperError, match="row 'uniform' is a merge row; this notebook runs train rows"):
        reproduce.execute(reproduce.template("train_row"), tmp_path / "x.ipynb",
                          dict(SMOKE, row="uniform", seed=0), "row uniform")


def test_reproduce_refuses_unknown_row_before_running():
    with pytest.raises(FmpaperError, match="unknown row 'nope'; rows are: baseline"):
        reproduce.reproduce(profile="smoke", rows=["baseline", "nope"], book=False, progress=False)


def test_progress_counts_expected_work(tmp_path, monkeypatch):
    cost = reproduce.row_cost
    assert cost("baseline") == 1.0 < cost("duorec_unsup") < cost("duorec_sup") < cost("cl4srec") < cost("duorec_supunsup")
    assert cost("cl4srec_infonce") == pytest.approx(cost("cl4srec") * 2 / 3)     # two encoder passes of three
    tuned = next(r for r in rows().values() if r.kind != "train" and r.finetune_epochs)
    assert cost(tuned.name) > cost("uniform") > 0
    monkeypatch.setenv("FMPAPER_RUNS", str(tmp_path))
    task = (0, "duorec_supunsup", "train")
    assert reproduce.work_units(task, "smoke", None) == 350
    done = run_dir("duorec_supunsup", None, "smoke", 0)
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    assert reproduce.work_units(task, "smoke", None) == 1                          # cached: read back only


def test_each_dataset_and_profile_has_its_book_folder():
    book = ROOT / "book"
    assert reproduce.book_folder("ml-100k", "quick") == book  # the main set
    assert reproduce.book_folder("ml-100k", "paper") == book / "ml-100k-paper"
    assert reproduce.book_folder(None, "paper") == book / "ml-1m-paper"
    assert reproduce.in_toc(book) and reproduce.in_toc(book / "ml-100k-paper")
    assert not reproduce.in_toc(book / "ml-100k-smoke")
    assert reproduce.book_folder("ml-1m", "quick") == book / "ml-1m-quick"


@pytest.mark.parametrize("folder", sorted({(ROOT / "book" / f).parent for f in reproduce.toc_files()
                                           if f.rsplit("/", 1)[-1] in reproduce.PAGES}))
def test_each_published_page_holds_the_set_of_its_folder(folder):
    """A page executed for one (dataset, profile) never sits in another set's folder."""
    for page in reproduce.PAGES:
        nb = nbformat.read(folder / f"{page}.ipynb", as_version=4)
        injected = [c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1, f"{folder.name}/{page}: not executed by papermill"
        params = {}
        exec(injected[0], {}, params)
        assert reproduce.book_folder(params["dataset"], params["profile"]) == folder, f"{folder.name}/{page}: {params}"


def test_cli_reports_one_line_and_fails():
    run = subprocess.run([sys.executable, "-m", "fmpaper", "reproduce", "--profile", "smoke", "--rows", "nope"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmpaper: error: unknown row 'nope'")


@pytest.mark.parametrize("args,message", [(["--seeds", "2-1"], "--seeds takes N"),
                                          (["--seeds", "a,b"], "--seeds takes N"),
                                          (["--jobs", "0"], "jobs must be a positive integer"),
                                          (["--threads", "0"], "threads must be a positive integer")])
def test_cli_bad_seeds_or_jobs(args, message):
    run = subprocess.run([sys.executable, "-m", "fmpaper", "reproduce", "--profile", "smoke", *args],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_thread_budget_reaches_child_processes_and_is_undone(monkeypatch):
    # a papermill kernel or a worker started inside the block sees the budget; after it, the
    # environment and torch's thread count are as they were
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    before = torch.get_num_threads()
    probe = [sys.executable, "-c", "import os; print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('MKL_NUM_THREADS'))"]
    with reproduce.thread_budget(1):
        assert subprocess.run(probe, capture_output=True, text=True).stdout.split() == ["1", "1"]
        assert torch.get_num_threads() == 1 and reproduce.core_budget() == 1
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "7"
    assert torch.get_num_threads() == before
    with reproduce.thread_budget(None):
        assert "OMP_NUM_THREADS" not in os.environ


def test_reproduce_rows_without_book(smoke_table, results_env):
    # two at a time; the uniform merge brings its three members, which start first (costliest first)
    out = reproduce.reproduce(profile="smoke", dataset="ml-100k", seeds=1, rows=["baseline", "uniform"],
                              book=False, progress=False, jobs=2)
    folder = results_env / "ml-100k-smoke"
    assert [p.name for p in out["rows"]] == ["duorec_supunsup-s0.ipynb", "duorec_sup-s0.ipynb",
                                             "duorec_unsup-s0.ipynb", "baseline-s0.ipynb", "uniform-s0.ipynb"]
    for p in out["rows"]:
        assert p.parent == folder / "notebooks"
        assert not [o for o in outputs(p) if o["output_type"] == "error"]
    for name in ("runs.csv", "table_as-run.csv", "table_paper.csv", "table_corrected.csv", "tables.md", "paired.csv",
                 "paired.md", "fisher_costs.csv"):
        assert (folder / name).is_file(), name
    # executed again over the cached run (with the same threads: the stamp names them), a row
    # notebook differs only in when it ran: kept as it was
    before = (folder / "notebooks" / "baseline-s0.ipynb").read_bytes()
    reproduce.run_rows("smoke", "ml-100k", [0], names=["baseline"], progress=False, jobs=2)
    assert (folder / "notebooks" / "baseline-s0.ipynb").read_bytes() == before


def test_same_but_execution_ignores_when_and_where_and_nothing_else():
    raw = (ROOT / "results" / "ml-100k-paper" / "notebooks" / "baseline-s0.ipynb").read_bytes()
    nb = json.loads(raw)
    nb["metadata"]["papermill"]["start_time"] = "2030-01-01T00:00:00+00:00"
    for cell in nb["cells"]:
        cell["metadata"].get("execution", {})["iopub.status.idle"] = "2030-01-01T00:00:01Z"
        if "injected-parameters" in cell["metadata"].get("tags", []):
            cell["id"] = "00000000"
    later = re.sub(r"Notebook executed [0-9-]+ [0-9:]+ UTC in [0-9.]+ s on .*? \(fmpaper ",     # another time and machine
                   "Notebook executed 2030-01-01 00:00:00 UTC in 9.9 s on Other(R) CPU, 8 threads (fmpaper ",
                   json.dumps(nb, indent=1))
    assert "Other(R) CPU, 8 threads (fmpaper 0.1.0, torch" in later
    assert later != raw.decode() and reproduce.same_but_execution(raw, later.encode())
    assert reproduce.same_but_execution(raw, raw)
    changed = json.loads(later)
    out = next(o for c in changed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if "data" in o)
    out["data"]["text/plain"] = ["something else"]
    assert not reproduce.same_but_execution(raw, json.dumps(changed).encode())
    assert not reproduce.same_but_execution(raw, b"not a notebook")
    newer = re.sub(r"\(fmpaper [0-9.]+, torch", "(fmpaper 9.9.9, torch", later)
    assert newer != later and not reproduce.same_but_execution(raw, newer.encode())    # versions count


def test_parallel_rows_stop_on_a_failing_row(tmp_path, results_env):
    # the three members fail; the uniform merge that needs them never starts
    with pytest.raises(FmpaperError) as err:
        reproduce.run_rows("smoke", str(tmp_path / "missing.inter"), [0], names=["uniform"],
                           progress=False, jobs=2)
    msg = str(err.value)
    assert msg.startswith("row duorec_") and "no such .inter file" in msg and "\n" not in msg
    assert not (results_env / "missing-smoke" / "notebooks" / "uniform-s0.ipynb").exists()


def test_failing_page_leaves_the_book_alone(tmp_path, results_env):
    book = tmp_path / "book"
    with pytest.raises(FmpaperError) as err:
        reproduce.run_pages("smoke", str(tmp_path / "missing.inter"), [0], book_dir=book)
    msg = str(err.value)
    assert msg.startswith("book page data: cell [") and "no such .inter file" in msg and "\n" not in msg
    assert not list(book.glob("*.ipynb"))  # nothing half-done reaches the book
    kept = results_env / "missing-smoke" / "notebooks" / "failed-data.ipynb"
    assert kept.is_file() and str(kept) in msg


# ----------------------------------------------------------------------------- book pages

def test_pages_executed_cleanly(pages):
    assert set(pages) == set(reproduce.PAGES)
    for name, path in pages.items():
        outs = outputs(path)
        assert not [o for o in outs if o["output_type"] == "error"], name
        assert not [o for o in outs if o["output_type"] == "stream" and o["name"] == "stderr"], name
        text = "\n".join(o.get("data", {}).get("text/plain", "") for o in outs)
        assert "Notebook executed" in text and "profile smoke" in text, name
        if name != "data":
            assert "Provenance: dataset ml-100k · profile smoke · seeds 0" in text and "NOT RUN YET" not in text


def test_results_page_tables_match_runs(pages, smoke_table, results_env):
    folder = results_env / "ml-100k-smoke"
    for protocol in ("as-run", "paper", "corrected"):
        table = pd.read_csv(folder / f"table_{protocol}.csv", index_col="row")
        for row, run in smoke_table.items():
            if get_row(row).family != "scratch":      # the results page shows the from-scratch rows
                assert row not in table.index
                continue
            test = json.loads((run / "metrics.json").read_text())["test"][protocol]
            for mode, name in (("full", "FULL"), ("uni100", "RANDOM"), ("pop100", "POPULAR")):
                for k in (10, 20):
                    assert abs(table.loc[row, f"{name} NDCG@{k} ours"] - test[mode][f"ndcg@{k}"]) <= 1e-9
        assert table.loc["baseline", "FULL NDCG@10 paper"] > 0  # the paper's column is there
    paired = pd.read_csv(folder / "paired.csv")
    assert set(paired["reference"]) == {"validation-selected model", "best member on test (oracle)", "uniform merge",
                                        "same merge, members of one seed"}
    one_seed = paired[paired["reference"] == "same merge, members of one seed"]
    assert set(one_seed["row"]) == {"fisher_exact_seeds", "uniform_seeds"}
    assert set(one_seed["reference_rows"]) == {"fisher_exact", "uniform"}
    assert paired["p_holm"].between(0, 1).all() and (paired["p_holm"] >= paired["p_wilcoxon"] - 1e-15).all()
    assert ((paired["ci_low"] <= paired["mean_diff"] + 1e-12) & (paired["mean_diff"] <= paired["ci_high"] + 1e-12)).all()
    assert paired["p_wilcoxon"].between(0, 1).all()


def test_figures_written(pages, results_env):
    folder = results_env / "ml-100k-smoke" / "figures"
    names = {"sequence_lengths", "paper_vs_ours", "fisher_time", "topk_mass", "weight_shares", "estimator_error"}
    for name in names:
        png = folder / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    images = [o for o in outputs(pages["figures"]) if "image/png" in o.get("data", {})]
    assert len(images) == len(names) - 1


def test_fisher_rows_benchmark_computes_what_the_rows_cached(smoke_table, tmp_path):
    # benchmarks/bench_fisher_rows.py times the Fishers of the merge rows: the same eleven
    # estimates of the same three members, bit for bit what the rows computed and cached
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_fisher_rows as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from fmpaper.runs import fisher_path
    specs, members = bench.specs_and_members("ml-100k", "smoke", 0)
    assert len(specs) == 11 and [d.name for d in members] == [
        run_dir(m, "ml-100k", "smoke", 0).name for m in get_row("fisher_exact").members]
    target = next(s for s in specs if s.estimator == "target")
    got = bench._one((str(members[0]), target, str(tmp_path / "t.safetensors")))
    assert got["estimator"] == "target" and got["seconds"] > 0
    mine, cached = load_file(str(tmp_path / "t.safetensors")), load_file(str(fisher_path(members[0], target)))
    assert mine.keys() == cached.keys() and all(torch.equal(mine[n], cached[n]) for n in mine)
    # members that were never trained: one line, non-zero exit
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fisher_rows.py"), "--dataset", "ml-100k",
                          "--profile", "smoke", "--seed", "97"], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip().startswith("error: members not in the run cache")
    assert len(run.stderr.strip().splitlines()) == 1


def test_pages_reexecute_identically_with_nbval(pages, tmp_path):
    """nbval re-executes the smoke-executed pages and compares every output (images aside) with
    the stored one, after sanitising the execution stamp (tests/nbval_sanitize.cfg)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-sanitize-with",
           str(SANITIZE), "--rootdir", str(tmp_path), *[str(p) for p in pages.values()]]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_profile_comparison_reads_each_profiles_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FMPAPER_RESULTS", str(tmp_path))
    base = dict(protocol="paper", mode="full", metric="ndcg@10")
    values = {"quick": {"baseline": [0.05, 0.07], "uniform": [0.03, 0.05], "ensemble": [0.045, 0.045]},
              "paper": {"baseline": [0.06], "uniform": [0.07], "ensemble": [0.02]}}
    for profile, rows_ in values.items():
        recs = [dict(base, row=r, seed=s, value=v) for r, vs in rows_.items() for s, v in enumerate(vs)]
        recs.append(dict(base, row="baseline", seed=0, value=9.0, mode="uni100"))  # another mode: ignored
        (tmp_path / f"ml-100k-{profile}").mkdir()
        pd.DataFrame(recs).to_csv(tmp_path / f"ml-100k-{profile}" / "runs.csv", index=False)
    c = results.profile_comparison("ml-100k")
    t = c.table
    assert t.loc["SASRec (CE)", ("quick (seeds 0, 1)", "mean")] == pytest.approx(0.06)
    assert t.loc["Uniform merge †", ("paper (seed 0)", "rank")] == 1
    assert t.loc["Output ensemble †", ("paper − quick", "")] == pytest.approx(-0.025)
    assert "Kendall's tau" in c.note and "-0.33" in c.note  # orders (b,e,u) vs (u,b,e)
    (tmp_path / "ml-100k-paper" / "runs.csv").unlink()
    assert results.profile_comparison("ml-100k").table.empty


def test_tables_are_not_rewritten_without_a_run_runs_csv_holds(smoke_table, tmp_path, monkeypatch):
    """A run cache lacking a run of the written runs.csv (a fresh machine before `fmpaper restore`,
    fewer seeds) gets one line naming the runs, and no file is rewritten."""
    monkeypatch.setenv("FMPAPER_RESULTS", str(tmp_path))
    folder = tmp_path / "ml-100k-smoke"
    folder.mkdir()
    runs = collect("ml-100k", "smoke", [0])
    extra = runs[runs["row"] == "baseline"].assign(seed=7)
    pd.concat([runs, extra]).to_csv(folder / "runs.csv", index=False)
    before = (folder / "runs.csv").read_text()
    with pytest.raises(FmpaperError, match=r"ml-100k-smoke/runs.csv holds 1 run\(s\) that this run cache or these "
                                           r"seeds lack \(baseline seed 7\): `fmpaper restore --dataset ml-100k"):
        results.write_tables("ml-100k", "smoke", [0])
    with pytest.raises(FmpaperError, match="baseline seed 7"):
        reproduce.reproduce(profile="smoke", dataset="ml-100k", seeds=1, rows=["baseline"], book=False, progress=False)
    assert (folder / "runs.csv").read_text() == before
    assert not {p.name for p in folder.iterdir()} & {"tables.md", "paired.csv", "table_paper.csv", "checkpoints"}


def test_same_dataset_tables_keep_the_published_value_beside_each_protocol():
    """On the paper's dataset the published column and our `paper` protocol column are two
    columns: the published value shows, and Δ is ours under as-run minus it."""
    recs = [dict(row="baseline", seed=0, protocol=p, mode="uni100", metric="ndcg@10", value=v, hardware="cpu",
                 train_seconds=1.0, fisher_seconds=0.0, merge_seconds=0.0)
            for p, v in (("as-run", 0.50), ("paper", 0.40), ("corrected", 0.30))]
    df = pd.DataFrame(recs)
    df.attrs.update(dataset="ml-1m", seeds=[0])
    random = next(t for t in results.show_tables(df).items if t.caption.startswith("RANDOM")).table
    published = float(load_paper_table().loc["baseline", "random_ndcg10"])
    row = random.loc["SASRec (CE)"]
    assert float(row[("NDCG@10", "published")]) == pytest.approx(published, abs=1e-4)
    assert row[("NDCG@10", "paper")].startswith("0.4000") and row[("NDCG@10", "as-run")].startswith("0.5000")
    assert float(row[("NDCG@10", "Δ")]) == pytest.approx(0.50 - published, abs=1e-4)
    df.attrs["dataset"] = "ml-100k"
    random = next(t for t in results.show_tables(df).items if t.caption.startswith("RANDOM")).table
    assert ("NDCG@10", "published (ML-1M)") in random.columns and ("NDCG@10", "Δ") not in random.columns


def test_a_row_finished_for_some_seeds_only_names_them_in_the_tables():
    """While a set's seeds are still training, a row's cells average the seeds it has: its label
    says which, so a one-seed mean is not read as a mean over the set."""
    recs = [dict(row=row, seed=s, protocol=p, mode="uni100", metric="ndcg@10", value=0.1 * (s + 1), hardware="cpu",
                 train_seconds=1.0, fisher_seconds=0.0, merge_seconds=0.0)
            for row, seeds in (("baseline", (0, 1)), ("uniform", (0,))) for s in seeds for p in PROTOCOLS]
    df = pd.DataFrame(recs)
    df.attrs.update(dataset="ml-1m", seeds=[0, 1])
    random = next(t for t in results.show_tables(df).items if t.caption.startswith("RANDOM")).table
    short = {n: n.split(" (seed")[0] for n in random.index}
    both, one = (next(n for n in random.index if short[n] == label) for label in labels(["baseline", "uniform"]))
    assert both == short[both] and one == f"{short[one]} (seed 0)"
    assert random.loc[both, ("NDCG@10", "paper")] == f"{0.15:.4f}±{np.std([0.1, 0.2], ddof=1):.4f}"
    assert random.loc[one, ("NDCG@10", "paper")] == "0.1000"


def test_the_protocols_table_names_the_seeds_of_a_row_that_has_only_some(smoke_table):
    """Over seeds 0 and 1 of the smoke set, where seed 1 holds the members of the three-seed merges
    (and whatever else ran): a row without seed 1 names seed 0, in the table and the paragraph."""
    st = protocols.rank_stats("ml-100k", "smoke", [0, 1]).drop_duplicates("row")
    expect = {n: "" if is_finished(run_dir(n, "ml-100k", "smoke", 1)) else " (seed 0)" for n in st["row"]}
    assert dict(zip(st["row"], st["seed_mark"])) == expect
    assert "" in expect.values() and " (seed 0)" in expect.values()
    t = protocols.rank_diagnostics("ml-100k", "smoke", [0, 1])
    assert set(t.index) == {label + expect[n] for n, label in zip(st["row"], labels(st["row"]))}
    partial = sum(m != "" for m in expect.values())
    text = protocols.popular_vs_full("ml-100k", "smoke", [0, 1]).text
    assert f"; {partial} of the {len(st)} rows so far for only the seeds the table names" in text
    assert "rows so far" not in protocols.popular_vs_full("ml-100k", "smoke", [0]).text


# ----------------------------------------------------------------------------- verify

def test_verify_recomputes_every_number_from_kept_checkpoints(smoke_table, results_env):

    folder = results_env / "ml-100k-smoke"
    folder.mkdir(parents=True, exist_ok=True)
    collect("ml-100k", "smoke", [0]).to_csv(folder / "runs.csv", index=False)
    kept = keep_checkpoints("ml-100k", "smoke", [0])
    # 6 trained rows of the table, cl4srec_as_run, 4 fine-tuned objectives, the 3 fine-tuned
    # members trained further, 12 merges trained further, the two members of other seeds that
    # the three-seed merges use, and the 26 plain merges (14 of the scratch family, 12 of the
    # fine-tuned one); no output ensemble
    of_rows = [p for p in kept if p.stem.rsplit("-s", 1)[0] not in extra_runs()]
    assert len(of_rows) == 28 + 26 and all(p.with_suffix(".json").is_file() for p in kept)
    names = {p.stem for p in kept}
    assert {"ft_uniform_tuned-s0", "duorec_sup-s1", "duorec_supunsup-s2", "cl4srec_as_run-s0",
            "fisher_exact-s0", "ft_uniform-s0", "uniform_seeds-s0"} <= names
    assert not names & {"ensemble-s0", "ft_ensemble-s0"}
    assert not list(checkpoint_dir("ml-100k", "smoke").glob("*.tmp"))
    ok = fm_cli("verify", "--dataset", "ml-100k", "--profile", "smoke")
    assert ok.returncode == 0, ok.stderr[-2000:]
    # 54 rows of runs.csv plus the 2 members of other seeds; 36 values per row (3 protocols x 3 modes x 4)
    assert ok.stdout.startswith("verified 56 runs of ml-100k-smoke (seeds 0): all 1944 values") and \
        ok.stdout.count("\n") == 1

    def fails(message):
        r = fm_cli("verify", "--dataset", "ml-100k", "--profile", "smoke", "--quiet")
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    # a number of runs.csv that the checkpoints do not give
    csv = pd.read_csv(folder / "runs.csv")
    good = csv.copy()
    i = csv.index[(csv["row"] == "fisher_topk_10") & (csv["protocol"] == "corrected") & (csv["mode"] == "uni100")
                  & (csv["metric"] == "ndcg@20")][0]
    csv.loc[i, "value"] += 1e-4
    csv.to_csv(folder / "runs.csv", index=False)
    fails("mismatch: fisher_topk_10 seed 0 corrected uni100 ndcg@20")
    good.to_csv(folder / "runs.csv", index=False)
    # a checkpoint whose config is not its row's
    conf = checkpoint_dir("ml-100k", "smoke") / "duorec_sup-s0.json"
    text = conf.read_text()
    conf.write_text(text.replace('"cl_weight": 0.1', '"cl_weight": 0.2'))
    fails("does not match row duorec_sup seed 0 (differs in cl_weight)")
    conf.write_text(text[: len(text) // 2])                               # cut short
    fails("checkpoint config duorec_sup-s0.json cannot be read")
    conf.write_text(text)
    # no checkpoints at all
    for p in checkpoint_dir("ml-100k", "smoke").iterdir():
        p.unlink()
    checkpoint_dir("ml-100k", "smoke").rmdir()
    fails("has no kept checkpoints")
    r = fm_cli("verify", "--dataset", "ml-100k", "--profile", "paper", "--quiet")
    assert r.returncode == 2 and ("nothing to verify" in r.stderr or "no kept checkpoints" in r.stderr)


def fm_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fmpaper", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_restore_rebuilds_the_trained_runs_a_fresh_machine_builds_on(smoke_table, results_env, tmp_path):
    """`fmpaper restore` into an empty runs root: the trained runs come back as the runs that
    trained them (record, history, test metrics), the kept merges as the merges (no Fisher
    recomputed), the output ensembles recomputed from their members, and a merge computed from
    the restored members is the merge computed from the originals."""
    folder = results_env / "ml-100k-smoke"
    folder.mkdir(parents=True, exist_ok=True)
    collect("ml-100k", "smoke", [0]).to_csv(folder / "runs.csv", index=False)
    # the runs the pages read besides the rows: the epoch-budget curve and a random-batch twin
    run_curve("ml-100k", "smoke", progress=False)
    run_row("duorec_unsup", "ml-100k", "smoke", 0, progress=False, group_by_length=False)
    kept = keep_checkpoints("ml-100k", "smoke", [0])
    assert {CURVE_NAME + "-s0", "duorec_unsup" + RANDOM_BATCHES + "-s0"} <= {p.stem for p in kept}
    records = [checkpoint_record("ml-100k", "smoke", p.stem.rsplit("-s", 1)[0], int(p.stem.rsplit("-s", 1)[1]))
               for p in kept]
    assert all(r.is_file() for r in records)
    root = tmp_path / "runs"
    env = {"FMPAPER_RUNS": str(root)}
    # one checkpoint kept without its record (as kept before records existed): runs.csv supplies it
    checkpoint_record("ml-100k", "smoke", "duorec_unsup", 0).unlink()
    # one merge not kept: computed below from the restored members
    weights, conf = checkpoint_files("ml-100k", "smoke", "fisher_random_10", 0)
    for f in (weights, conf, checkpoint_record("ml-100k", "smoke", "fisher_random_10", 0)):
        f.unlink()
    kept.remove(weights)
    ok = fm_cli("restore", "--dataset", "ml-100k", "--profile", "smoke", "--quiet", env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    # the output ensembles have no weights: recomputed from their restored members
    ensembles = sorted({n for n in pd.read_csv(folder / "runs.csv")["row"] if get_row(n).kind == "ensemble"})
    assert ensembles == ["ensemble", "ft_ensemble"]
    restored = len(kept) + len(ensembles)
    assert ok.stdout.startswith(f"restored {restored} runs of ml-100k-smoke into {root} (0 already there)")
    # the curve, the twin and the members of other seeds have no line in runs.csv: the summary
    # says how many were not compared with it
    csv = pd.read_csv(folder / "runs.csv")
    unlisted = {p.stem for p in kept} - {f"{r}-s{s}" for r, s in zip(csv["row"], csv["seed"])}
    assert {CURVE_NAME + "-s0", "duorec_unsup" + RANDOM_BATCHES + "-s0"} <= unlisted
    assert f"within 1e-06 ({len(unlisted)} not in runs.csv: not compared with it)" in ok.stdout, ok.stdout
    for name in ensembles:
        a = json.loads((smoke_table[name] / "metrics.json").read_text())
        b = json.loads((run_dir(name, "ml-100k", "smoke", 0, root=root) / "metrics.json").read_text())
        assert_close_metrics(b["test"], a["test"], tol=1e-6)
        threads = max(1, reproduce.core_budget() // 2)                 # --jobs 2: a job's share, as in reproduce
        assert b["hardware"].endswith(f", {threads} thread{'' if threads == 1 else 's'}"), b["hardware"]
    for name in ("fisher_exact", "ft_fisher_model_10", "uniform_seeds"):
        orig, back = smoke_table[name], run_dir(name, "ml-100k", "smoke", 0, root=root)
        a, b = json.loads((orig / "metrics.json").read_text()), json.loads((back / "metrics.json").read_text())
        assert_close_metrics(b["test"], a["test"], tol=1e-6)
        assert b["members"] == a["members"] and b.get("fisher_seconds") == a.get("fisher_seconds")
        assert "valid_ndcg@10" not in b                   # a plain merge records none
    assert not list(root.rglob("fisher/*.safetensors"))  # restored merges computed no Fisher
    for name in ("baseline", "cl4srec_as_run", "ft_uniform_tuned", "duorec_unsup"):
        orig, back = smoke_table[name], run_dir(name, "ml-100k", "smoke", 0, root=root)
        a, b = json.loads((orig / "metrics.json").read_text()), json.loads((back / "metrics.json").read_text())
        for key in ("best_epoch", "epochs_run", "train_seconds", "hardware"):
            assert b[key] == pytest.approx(a[key]), (name, key)
        assert_close_metrics(b["test"], a["test"], tol=1e-6)
        assert b["restored_from"] == f"{name}-s0.safetensors"
        assert not any(k.startswith("restored_") for k in training_record(back)["metrics"])   # kept again as trained
        if name != "duorec_unsup":
            assert (back / "history.json").read_text() == (orig / "history.json").read_text()
    assert json.loads((run_dir("duorec_unsup", "ml-100k", "smoke", 0, root=root) / "metrics.json").read_text())[
        "record"] == "runs.csv"
    for orig, back in ((curve_dir("ml-100k", "smoke"), curve_dir("ml-100k", "smoke", root=root)),
                       (run_dir("duorec_unsup", "ml-100k", "smoke", 0, group_by_length=False),
                        run_dir("duorec_unsup", "ml-100k", "smoke", 0, root=root, group_by_length=False))):
        assert (back / "history.json").read_text() == (orig / "history.json").read_text()
        assert json.loads((back / "metrics.json").read_text())["valid_ndcg@10"] == pytest.approx(
            json.loads((orig / "metrics.json").read_text())["valid_ndcg@10"], abs=1e-6)
    # a merge from the restored members equals the merge from the originals
    merged = run_row("fisher_random_10", "ml-100k", "smoke", 0, root=root, progress=False)
    assert_close_metrics(merged["test"], json.loads((smoke_table["fisher_random_10"] / "metrics.json").read_text())["test"],
                         tol=1e-6)
    again = fm_cli("restore", "--dataset", "ml-100k", "--profile", "smoke", "--quiet", env=env)
    assert again.returncode == 0 and f"restored 0 runs of ml-100k-smoke into {root} ({restored} already there)" \
        in again.stdout
    # a checkpoint that does not give runs.csv's numbers is refused and leaves no run behind
    csv = pd.read_csv(folder / "runs.csv")
    csv.loc[(csv["row"] == "baseline") & (csv["mode"] == "full"), "value"] += 1e-3
    csv.to_csv(folder / "runs.csv", index=False)
    fresh = {"FMPAPER_RUNS": str(tmp_path / "fresh")}
    bad = fm_cli("restore", "--dataset", "ml-100k", "--profile", "smoke", "--seeds", "1", "--jobs", "1", "--quiet",
                 env=fresh)
    assert bad.returncode == 2 and "mismatch, not restored: baseline seed 0" in bad.stderr, bad.stderr[-2000:]
    assert not run_dir("baseline", "ml-100k", "smoke", 0, root=tmp_path / "fresh").exists()
    none = fm_cli("restore", "--dataset", "ml-100k", "--profile", "paper", "--quiet", env=fresh)
    assert none.returncode == 2 and "nothing to restore" in none.stderr and none.stderr.count("\n") == 1


def test_restore_waits_for_a_training_of_the_same_run(smoke_table, results_env, tmp_path, monkeypatch):
    """A run being trained elsewhere (its lock held, its .partial folder in use) is not cleared by
    restore: restore waits on the lock, then reads the finished run instead of rebuilding it (and
    evaluates nothing: the run it reads is the training's)."""
    evaluated = []
    monkeypatch.setattr(verify, "valid_ndcg10", lambda *a: evaluated.append(a) or 0.0)
    folder = results_env / "ml-100k-smoke"
    folder.mkdir(parents=True, exist_ok=True)
    collect("ml-100k", "smoke", [0]).to_csv(folder / "runs.csv", index=False)
    keep_checkpoints("ml-100k", "smoke", [0])
    root = tmp_path / "runs"
    out = run_dir("baseline", "ml-100k", "smoke", 0, root=root)
    part = partial_dir(out)
    result = {}
    with exclusive(out):                                      # "a training in another process"
        part.mkdir(parents=True)
        (part / "epoch.pt").write_text("in use")
        waiter = threading.Thread(target=lambda: result.update(
            m=verify.restore_run("baseline", "ml-100k", "smoke", 0, root)))
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive() and (part / "epoch.pt").read_text() == "in use"
        shutil.copytree(smoke_table["baseline"], out)          # the training finishes
        shutil.rmtree(part)
        stamp = (out / "metrics.json").stat().st_mtime_ns
    waiter.join(timeout=120)
    assert not waiter.is_alive() and "restored_from" not in result["m"]
    assert (out / "metrics.json").stat().st_mtime_ns == stamp   # read back, not rebuilt
    assert not evaluated


def test_oracle_reference_is_the_best_member_on_test(smoke_table):
    paired = paired_tests("ml-100k", "smoke", [0], names=["fisher_exact"], n_boot=50)
    oracle = paired[paired["reference"] == "best member on test (oracle)"]
    assert len(oracle) == 5                                              # FULL + 4 sampled columns
    for _, r in oracle.iterrows():
        key = f"{r['protocol']}.{r['mode']}"
        means = {m: user_ndcg(smoke_table[m], key).mean() for m in rows()["fisher_exact"].members}
        assert r["reference_rows"] == max(means, key=means.get)
        assert r["mean_diff"] == pytest.approx(user_ndcg(smoke_table["fisher_exact"], key).mean() - max(means.values()))


def test_merges_trained_further_meet_members_trained_as_long(smoke_table):
    """The budget-matched reference: the best of the members trained the same extra CE epochs,
    only for merges trained further, and the tuned uniform merge as their uniform reference."""
    name = "ft_fisher_exact_tuned"
    paired = paired_tests("ml-100k", "smoke", [0], names=[name, "ft_fisher_exact"], n_boot=50, family="finetuned")
    matched = paired[paired["reference"] == AS_LONG]
    assert set(matched["row"]) == {name} and len(matched) == 5
    for _, r in matched.iterrows():
        key = f"{r['protocol']}.{r['mode']}"
        means = {f"{m}_tuned": user_ndcg(smoke_table[f"{m}_tuned"], key).mean() for m in rows()[name].members}
        assert r["reference_rows"] == max(means, key=means.get)
        assert r["mean_diff"] == pytest.approx(user_ndcg(smoke_table[name], key).mean() - max(means.values()))
    uniform = paired[paired["reference"] == UNIFORM]
    assert set(uniform["reference_rows"]) == {"ft_uniform_tuned", "ft_uniform"}
    assert set(uniform[uniform["row"] == name]["reference_rows"]) == {"ft_uniform_tuned"}


def test_an_oracle_needs_every_member(smoke_table, monkeypatch):
    """While one member trained as long is unfinished, the merge trained further has no
    budget-matched reference for that seed (the best of the other two would be a weaker one)."""
    name = "ft_fisher_exact_tuned"
    missing = run_dir("ft_duorec_sup_tuned", "ml-100k", "smoke", 0)
    finished = stats.is_finished
    monkeypatch.setattr(stats, "is_finished", lambda d: Path(d) != missing and finished(d))
    paired = paired_tests("ml-100k", "smoke", [0], names=[name], n_boot=50, family="finetuned")
    assert AS_LONG not in set(paired["reference"]) and ORACLE in set(paired["reference"])


def test_fisher_error_table_times_the_runs_not_a_recomputation(smoke_table, tmp_path, monkeypatch):
    """The figures page's estimator-error table gives each Fisher's seconds as the merge run
    recorded them (the exact Fisher's from the fisher_exact row), as its cost table does: Fisher
    files recomputed later (after a restore, on another machine) time the recomputation."""
    seed_dir = smoke_table["fisher_topk_10"].parent
    root = tmp_path / "runs"
    shutil.copytree(seed_dir, root / seed_dir.relative_to(seed_dir.parents[2]))
    monkeypatch.setenv("FMPAPER_RUNS", str(root))
    for meta in (root / seed_dir.relative_to(seed_dir.parents[2]) / "fisher").glob("*.json"):  # "recomputed" files
        meta.write_text(json.dumps(dict(json.loads(meta.read_text()), seconds=9999.0)))
    err = figures.fisher_errors("ml-100k", "smoke", 1, rows=["fisher_topk_10"])
    recorded = {m["run"].rsplit("-", 1)[0]: m["seconds"]
                for m in json.loads((smoke_table["fisher_topk_10"] / "metrics.json").read_text())["fisher"]}
    exact = {m["run"].rsplit("-", 1)[0]: m["seconds"]
             for m in json.loads((smoke_table["fisher_exact"] / "metrics.json").read_text())["fisher"]}
    assert len(err) == 3 and set(err["model"]) == set(recorded)
    assert dict(zip(err["model"], err["seconds"])) == recorded
    assert dict(zip(err["model"], err["exact_seconds"])) == exact
    assert 9999.0 not in set(err["seconds"]) | set(err["exact_seconds"])


def test_ordering_summary_says_when_too_few_fisher_rows_ran(monkeypatch):
    """With fewer than two of the ten sampled Fisher rows finished there is no spread to state
    (the paper profile before its merges): the text says so instead of printing nan."""
    recs = [dict(row=r, seed=0, protocol="paper", mode="full", metric="ndcg@10", value=v)
            for r, v in (("baseline", 0.06), ("fisher_topk_10", 0.05))]
    monkeypatch.setattr(anomalies, "runs_table", lambda *a, **k: pd.DataFrame(recs))
    text = repr(anomalies.ordering_summary("ml-100k", "paper", 1))
    assert "nan" not in text and "1 of ours is finished" in text
    recs.append(dict(recs[-1], row="fisher_topk_30", value=0.07))
    assert "ours span 0.0200" in repr(anomalies.ordering_summary("ml-100k", "paper", 1))
