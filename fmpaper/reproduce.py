"""`fmpaper reproduce`: every row of the table through its notebook, then the book.

1. For each seed and row: execute the row's notebook template (notebooks/train_row.ipynb for
   trained rows, notebooks/merge_row.ipynb for merges and the ensemble) with papermill; the
   executed copy goes to results/<dataset>-<profile>/notebooks/<row>-s<seed>.ipynb. Rows are
   cached runs (fmpaper.runs), so a re-run only executes the notebooks.
   The trained rows' weights are then kept in results/<dataset>-<profile>/checkpoints/ (see
   fmpaper.verify).
2. Execute the book's pages (notebooks/data, results, figures, protocols, anomalies) with
   dataset/profile/seeds into book/ (ML-100K quick, the main set) or book/<dataset>-<profile>/.
   Each is executed in a scratch folder and moved into the book only when it succeeded, so the
   book never holds a page with a traceback.
3. `jupyter-book build book/ -W -n --keep-going` (warnings are errors).

A notebook that raises stops everything with one line naming the row (or page) and the failing
cell; the executed notebook holding the full traceback is kept and named in that line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import nbformat
import papermill as pm
import torch
import yaml
from papermill.exceptions import PapermillExecutionError
from tqdm import tqdm

from . import FmpaperError, environment, first_line
from .config import PROFILES, make_config
from .pages.display import STAMP_EXECUTION, check_params
from .pages.results import write_tables
from .rows import get_row, in_family, with_needs
from .runs import (check_nothing_dropped, checkpoint_dir, collect, finished_by, is_finished, keep_checkpoints,
                   repo_root, results_dir, run_dir)

PAGES = ("data", "results", "figures", "protocols", "anomalies", "fidelity")
# the (dataset, profile) whose pages sit at the top of book/; every other one gets its own
# folder book/<dataset>-<profile>/ (listed in _toc.yml once it is published)
MAIN_SET = "ml-100k-quick"
ROW_TEMPLATES = {"train": "train_row", "merge": "merge_row", "ensemble": "merge_row"}
KERNEL = "python3"


def _root() -> Path:
    root = repo_root()
    if root is None or not (root / "notebooks").is_dir():
        raise FmpaperError("fmpaper reproduce needs the source checkout (notebooks/ and book/ next to "
                           "the package); install it with `pip install -e .` from the repository")
    return root


def template(name: str) -> Path:
    path = _root() / "notebooks" / f"{name}.ipynb"
    if not path.is_file():
        raise FmpaperError(f"notebook template {path} is missing")
    return path


def _failing_line(e) -> str:
    """The line of the cell the traceback points at (else the cell's first line)."""
    lines = str(e.source or "").splitlines()
    for frame in e.traceback or []:
        m = re.search(r"----> (\d+)", re.sub(r"\x1b\[[0-9;]*m", "", frame))
        if m:
            n = int(m.group(1))
            if 1 <= n <= len(lines):
                return lines[n - 1].strip()
            break
    return first_line(e.source)


def execute(src: Path, out: Path, parameters: dict, what: str, timeout: int | None = None) -> Path:
    """Run notebook `src` with papermill into `out`; FmpaperError with one line naming `what`
    and the failing cell if it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = out.read_bytes() if out.is_file() else None
    try:
        pm.execute_notebook(str(src), str(out), parameters=parameters, kernel_name=KERNEL,
                            progress_bar=False, log_output=False, cwd=str(src.parent),
                            execution_timeout=timeout,
                            extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as e:
        cell = f"cell [{e.exec_count}]" if e.exec_count else f"cell #{e.cell_index}"
        raise FmpaperError(f"{what}: {cell} `{_failing_line(e)}` raised {e.ename}: "
                           f"{first_line(e.evalue)} (executed notebook: {out})") from None
    except FmpaperError:
        raise
    except Exception as e:  # kernel died, missing kernel, bad notebook, timeout
        raise FmpaperError(f"{what}: notebook {src.name} could not run: {type(e).__name__}: "
                           f"{first_line(e) or 'no message'}") from None
    _tidy(out, src)
    if before is not None and same_but_execution(before, out.read_bytes()):
        out.write_bytes(before)   # a cached run read back again: keep the file, not new timestamps
    return out


def same_but_execution(a: bytes, b: bytes) -> bool:
    """Whether two executed notebooks differ only in when and where they ran: papermill's start
    and end times and durations, the kernel's per-cell execution times, the id papermill gives the
    cell it injects, and the time and machine in the notebook's own stamp (`STAMP_EXECUTION`).
    Re-executing a notebook over cached runs, on this machine or another, then leaves its file
    untouched when every output is the same."""
    def core(raw):
        nb = json.loads(STAMP_EXECUTION.sub("Notebook executed (fmpaper ", raw.decode()))
        for key in ("start_time", "end_time", "duration"):
            nb.get("metadata", {}).get("papermill", {}).pop(key, None)
        for cell in nb.get("cells", []):
            cell.get("metadata", {}).pop("papermill", None)
            cell.get("metadata", {}).pop("execution", None)
            if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
                cell.pop("id", None)
        return nb
    try:
        return core(a) == core(b)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return False


def _tidy(path: Path, src: Path, final: Path | None = None) -> None:
    """Record the template and the executed copy relative to the checkout, not as local paths,
    and fold the cell papermill injects with the parameters (the page shows results first)."""
    root = _root()

    def rel(p):
        try:
            return Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            return Path(p).name
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            cell.metadata["tags"] = [*tags, "hide-cell"]
    meta = nb.metadata.get("papermill")
    if meta is not None:
        meta["input_path"] = rel(src)
        meta["output_path"] = rel(final or path)
    nbformat.write(nb, str(path))


# relative cost of training each variant (benchmarks/results_train.json, per step vs sasrec):
# the longest trainings start first when rows run in parallel, and the progress bar counts work
# done in these units, so its time estimate does not assume every row costs the same
TRAIN_COST = {"sasrec": 1.0, "duorec_unsup": 1.9, "duorec_sup": 2.5, "cl4srec": 3.2, "duorec_supunsup": 3.5}
COMBINE_COST = 0.3          # a merge or ensemble: Fishers of three models and one evaluation
FINETUNE_COST = 1.0         # training a merge further: a SASRec training of at most the profile's epochs


def row_cost(name: str) -> float:
    """Expected cost of a row relative to one SASRec training (cl4srec without its CE term runs
    two encoder passes instead of three)."""
    r = get_row(name)
    if r.kind != "train":
        return COMBINE_COST + FINETUNE_COST * bool(r.finetune_epochs)
    cost = TRAIN_COST.get(r.variant, 1.0)
    return cost * 2 / 3 if dict(r.settings).get("cl4srec_ce") is False else cost


def work_units(task, profile: str, dataset: str | None) -> int:
    """A row's share of the progress bar, in hundredths of a SASRec training: its expected cost,
    or one unit when the run is cached already (its notebook only reads it back)."""
    seed, name, _ = task
    if is_finished(run_dir(name, dataset, profile, seed)):
        return 1
    return round(100 * row_cost(name))


def _row_plan(names, seeds, profile: str = "quick"):
    """[(seed, row, kind)] in the order to start them: every requested row (default: every row
    that runs in `profile`) for every seed, plus every run it is computed from (`Row.needs`:
    members, members of other seeds, the run a fine-tuned row starts from), in order of
    dependency depth, the costliest first within a depth."""
    names = in_family(None, profile) if names is None else list(names)
    for n in names:
        get_row(n)  # FmpaperError listing the rows for an unknown name
    plan = [(s, n, get_row(n).kind) for n, s in with_needs((n, s) for s in seeds for n in names)]

    def depth(name):
        return 1 + max((depth(d) for d, _ in get_row(name).needs(0)), default=-1)
    plan.sort(key=lambda t: (depth(t[1]), -row_cost(t[1]), t[0]))
    return plan


def _needs(task) -> set:
    """The plan's tasks that must finish before `task` starts."""
    return {(s, n, get_row(n).kind) for n, s in get_row(task[1]).needs(task[0])}


def _execute_row(task, profile, dataset, folder) -> Path:
    seed, name, kind = task
    params = {"row": name, "dataset": dataset, "profile": profile, "seed": seed}
    return execute(template(ROW_TEMPLATES[kind]), folder / f"{name}-s{seed}.ipynb", params,
                   f"row {name} (seed {seed})")


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")   # what a child process reads its threads from


def core_budget() -> int:
    """The cores this process may use: OMP_NUM_THREADS when set (`fmpaper reproduce --threads`
    sets it), else every core. Parallel jobs split it; notebook kernels inherit it."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


@contextmanager
def thread_budget(threads: int | None):
    """Within the block, this process and every process it starts (workers, papermill kernels)
    use at most `threads` threads (None: leave the environment as it is). A page kernel beside a
    training otherwise takes every core and the two slow each other several times over."""
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise FmpaperError(f"threads must be a positive integer, got {threads!r}")
    saved = torch.get_num_threads()
    with environment({var: str(threads) for var in THREAD_VARS}):
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


def _worker_threads(threads: int) -> None:
    # one job's share of the cores: for the work done in the worker, and for the kernels
    # papermill starts from it (they inherit the environment)
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)


def run_tasks(fn, tasks: list, needs: dict, jobs: int, units: dict, desc: str, noun: str,
              progress: bool = True, on_done=None) -> dict:
    """fn(task) for every task, `jobs` at a time in spawned processes with core_budget()/jobs threads each
    (jobs=1: here, in order), a task starting once every task in needs[task] has finished. The
    bar advances by units[task] (integers, so the updates add up to the total exactly).
    on_done(task, result) runs here as each task ends. The first FmpaperError, from a task or
    from on_done, stops new starts and is raised once the running tasks have ended.
    Returns {task: result}."""
    bar = tqdm(total=sum(units.values()), desc=desc, disable=not progress,
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")
    finished = {}

    def finish(task, result):
        if on_done is not None:
            on_done(task, result)
        finished[task] = result
        bar.set_postfix_str(f"{len(finished)}/{len(tasks)} {noun}")
        bar.update(units[task])
    if jobs == 1:
        for task in tasks:
            finish(task, fn(task))
        bar.close()
        return finished
    threads = max(1, core_budget() // jobs)
    running, waiting, error = {}, list(tasks), None
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_threads,
                             initargs=(threads,)) as pool:
        while (waiting and error is None) or running:
            while error is None and len(running) < jobs:
                ready = [t for t in waiting if needs[t] <= finished.keys()]
                if not ready:
                    break
                waiting.remove(ready[0])
                running[pool.submit(fn, ready[0])] = ready[0]
            if not running:  # nothing can start: a task it needs failed
                break
            for fut in wait(running, return_when=FIRST_COMPLETED)[0]:
                task = running.pop(fut)
                try:
                    finish(task, fut.result())
                except FmpaperError as e:
                    error = error or e
    bar.close()
    if error is not None:
        raise error
    return finished


def run_rows(profile: str, dataset: str | None, seeds: list[int], names=None, progress: bool = True,
             jobs: int = 1) -> list[Path]:
    """Execute the row notebooks, `jobs` at a time (a combined row starts once its members are
    trained); returns the executed notebooks in plan order."""
    plan = _row_plan(names, seeds, profile)
    folder = results_dir(dataset, profile) / "notebooks"
    needs = {t: _needs(t) for t in plan}
    # the bar counts expected work, not rows, so its remaining time is fair
    units = {t: work_units(t, profile, dataset) for t in plan}
    done = run_tasks(partial(_execute_row, profile=profile, dataset=dataset, folder=folder), plan, needs,
                     jobs, units, "rows (work units)", "rows", progress)
    return [done[t] for t in plan]


def run_pages(profile: str, dataset: str | None, seeds: list[int], book_dir: Path | None = None,
              pages=PAGES, say=None) -> list[Path]:
    """Execute the book's page notebooks and copy them into `book_dir` (default: the set's own
    folder, `book_folder`) once all of them succeeded: a failure leaves the book as it was and
    keeps the failed notebook under results/<dataset>-<profile>/notebooks/failed-<page>.ipynb."""
    book_dir = Path(book_dir or book_folder(dataset, profile))
    failed_dir = results_dir(dataset, profile) / "notebooks"
    params = {"dataset": dataset, "profile": profile,
              "seeds": len(seeds) if list(seeds) == list(range(len(seeds))) else list(seeds)}
    with tempfile.TemporaryDirectory() as tmp:
        for page in pages:
            if say:
                say(f"book page {page} ...")
            scratch = Path(tmp) / f"{page}.ipynb"
            try:
                execute(template(page), scratch, params, f"book page {page}")
            except FmpaperError as err:
                if not scratch.exists():
                    raise
                keep = failed_dir / f"failed-{page}.ipynb"
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(scratch, keep)
                raise FmpaperError(str(err).replace(str(scratch), str(keep))) from None
            (failed_dir / f"failed-{page}.ipynb").unlink(missing_ok=True)
        book_dir.mkdir(parents=True, exist_ok=True)
        for page in pages:
            new, dst = Path(tmp) / f"{page}.ipynb", book_dir / f"{page}.ipynb"
            _tidy(new, template(page), dst)
            if not (dst.is_file() and same_but_execution(dst.read_bytes(), new.read_bytes())):
                shutil.copyfile(new, dst)
    return [book_dir / f"{page}.ipynb" for page in pages]


def book_folder(dataset: str | None, profile: str) -> Path:
    """Where the pages of (dataset, profile) go: book/ for the main set, else book/<dataset>-<profile>/."""
    name = results_dir(dataset, profile).name
    return _root() / "book" if name == MAIN_SET else _root() / "book" / name


def toc_files() -> list[str]:
    """Every page _toc.yml lists, as paths relative to book/ without suffix."""
    toc = yaml.safe_load((_root() / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections"))
            walk(e.get("chapters"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def in_toc(folder: Path) -> bool:
    """Whether _toc.yml lists the results page of the pages in `folder`."""
    return (Path(folder) / "results").relative_to(_root() / "book").as_posix() in toc_files()


def jupyter_book() -> list[str]:
    """The jupyter-book command of this environment."""
    exe = Path(sys.executable).with_name("jupyter-book")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    raise FmpaperError("jupyter-book is not installed (pip install -r requirements.txt)")


def build_book(book_dir: Path | None = None, output: Path | None = None) -> Path:
    """`jupyter-book build book/ -W -n --keep-going` from the repository root (it finds the root
    _config.yml by itself; book/_toc.yml links to the root _toc.yml). Returns the HTML folder."""
    root = _root()
    book_dir = Path(book_dir or root / "book")
    cmd = jupyter_book() + ["build", str(book_dir), "-W", "-n", "--keep-going", "--quiet"]
    if output is not None:
        cmd += ["--path-output", str(output)]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if run.returncode != 0:
        text = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
        lines = [ln for ln in text.splitlines() if "WARNING" in ln or "ERROR" in ln or "Error" in ln] \
            or text.splitlines()[-5:] or ["no output"]
        raise FmpaperError(f"jupyter-book build failed ({len(lines)} problem(s)); first: {first_line(lines[0])}")
    return Path(output or root) / "_build" / "html"


def reproduce(profile: str = "quick", dataset: str | None = None, seeds=1, rows=None, book: bool = True,
              progress: bool = True, jobs: int = 1, compute: bool = True, threads: int | None = None) -> dict:
    """Every row (for seeds 0..seeds-1, or the listed seeds) through its notebook, `jobs` rows
    at a time, then the book (unless book=False: then only the result tables are written).
    compute=False skips the rows: the pages then show the runs finished so far (and list the
    missing ones), for a partial result while long trainings go on. threads bounds the threads
    of everything it runs (the rows share them; default: OMP_NUM_THREADS, else every core).
    Returns what was written."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise FmpaperError(f"jobs must be a positive integer, got {jobs!r}")
    with thread_budget(threads):
        return _reproduce(profile, dataset, seeds, rows, book, progress, jobs, compute)


def _reproduce(profile, dataset, seeds, rows, book, progress, jobs, compute) -> dict:
    if profile not in PROFILES:
        raise FmpaperError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    seed_list = p["seeds"]
    dataset = dataset or make_config(profile).dataset  # explicit in every executed notebook
    _row_plan(rows, seed_list, profile)  # validate before anything runs
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    say(f"fmpaper reproduce: profile {profile}, dataset {p['dataset']}, seeds {seed_list}, {jobs} job(s), "
        f"{core_budget()} thread(s)")
    notebooks = run_rows(profile, dataset, seed_list, rows, progress, jobs) if compute else []
    if compute:
        say(f"rows done in {time.perf_counter() - t0:.0f} s: executed notebooks in "
            f"{results_dir(dataset, profile) / 'notebooks'}")
    # from here on the set of runs is fixed: one finishing beside this command (another
    # training) stays out of the kept checkpoints, the tables and every page alike
    with finished_by(time.time()):
        return _write(dataset, profile, seed_list, book, notebooks, say, t0)


def _write(dataset, profile, seed_list, book, notebooks, say, t0) -> dict:
    """The kept checkpoints, the tables, the pages and the book, from the finished runs."""
    check_nothing_dropped(dataset, profile, collect(dataset, profile, seed_list))   # before any file is written
    kept = keep_checkpoints(dataset, profile, seed_list)
    say(f"{len(kept)} checkpoints kept in {checkpoint_dir(dataset, profile)} (`fmpaper verify` and `fmpaper restore` read them)")
    out = {"rows": notebooks, "pages": [], "html": None}
    if not book:
        write_tables(dataset, profile, seed_list)
        say(f"tables written to {results_dir(dataset, profile)}")
        return out
    folder = book_folder(dataset, profile)
    out["pages"] = run_pages(profile, dataset, seed_list, say=say)
    if not in_toc(folder):
        rel = folder.relative_to(_root() / "book").as_posix()
        say(f"pages written to {folder}; the book shows them once _toc.yml lists them "
            f"(a part with the files {rel}/{', '.join(PAGES)})")
    say("building the book (jupyter-book build book/ -W -n --keep-going) ...")
    out["html"] = build_book()
    say(f"done in {time.perf_counter() - t0:.0f} s; open {out['html'] / 'index.html'}")
    return out
