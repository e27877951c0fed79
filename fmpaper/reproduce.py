"""`fmpaper reproduce`: every row of the table through its notebook, then the book.

1. For each seed and row: execute the row's notebook template (notebooks/train_row.ipynb for
   trained rows, notebooks/merge_row.ipynb for merges and the ensemble) with papermill; the
   executed copy goes to results/<dataset>-<profile>/notebooks/<row>-s<seed>.ipynb. Rows are
   cached runs (fmpaper.experiments), so a re-run only executes the notebooks.
2. Execute the book's pages (notebooks/data, results, figures) with dataset/profile/seeds into
   book/. Each is executed in a scratch folder and moved into book/ only when it succeeded, so
   the book never holds a page with a traceback.
3. `jupyter-book build book/ -W -n --keep-going` (warnings are errors).

A notebook that raises stops everything with one line naming the row (or page) and the failing
cell; the executed notebook holding the full traceback is kept and named in that line.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import FmpaperError
from .config import PROFILES, make_config

PAGES = ("data", "results", "figures", "protocols")
ROW_TEMPLATES = {"train": "train_row", "merge": "merge_row", "ensemble": "merge_row"}
KERNEL = "python3"


def _root() -> Path:
    from .results import repo_root
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


def _first_line(text) -> str:
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return lines[0] if lines else ""


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
    return _first_line(e.source)


def execute(src: Path, out: Path, parameters: dict, what: str, timeout: int | None = None) -> Path:
    """Run notebook `src` with papermill into `out`; FmpaperError with one line naming `what`
    and the failing cell if it raises."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(src), str(out), parameters=parameters, kernel_name=KERNEL,
                            progress_bar=False, log_output=False, cwd=str(src.parent),
                            execution_timeout=timeout,
                            extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as e:
        cell = f"cell [{e.exec_count}]" if e.exec_count else f"cell #{e.cell_index}"
        raise FmpaperError(f"{what}: {cell} `{_failing_line(e)}` raised {e.ename}: "
                           f"{_first_line(e.evalue)} (executed notebook: {out})") from None
    except FmpaperError:
        raise
    except Exception as e:  # kernel died, missing kernel, bad notebook, timeout
        raise FmpaperError(f"{what}: notebook {src.name} could not run: {type(e).__name__}: "
                           f"{_first_line(e) or 'no message'}") from None
    _tidy(out, src)
    return out


def _tidy(path: Path, src: Path, final: Path | None = None) -> None:
    """Record the template and the executed copy relative to the checkout, not as local paths."""
    import nbformat
    root = _root()

    def rel(p):
        try:
            return Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            return Path(p).name
    nb = nbformat.read(str(path), as_version=4)
    meta = nb.metadata.get("papermill")
    if meta is not None:
        meta["input_path"] = rel(src)
        meta["output_path"] = rel(final or path)
        nbformat.write(nb, str(path))


def _row_plan(rows, seeds):
    from .experiments import get_row
    from .experiments import rows as all_rows
    names = list(all_rows()) if rows is None else list(rows)
    for n in names:
        get_row(n)  # FmpaperError listing the rows for an unknown name
    # trained rows before the rows that combine them (their notebooks then only read the cache)
    names.sort(key=lambda n: get_row(n).kind != "train")
    return [(s, n, get_row(n).kind) for s in seeds for n in names]


def run_rows(profile: str, dataset: str | None, seeds: list[int], rows=None, progress: bool = True) -> list[Path]:
    """Execute the row notebooks; returns the executed notebooks."""
    from tqdm import tqdm

    from .results import results_dir
    plan = _row_plan(rows, seeds)
    folder = results_dir(dataset, profile) / "notebooks"
    done = []
    bar = tqdm(plan, desc="rows", unit="row", disable=not progress)
    for seed, name, kind in bar:
        bar.set_postfix_str(f"{name} s{seed}")
        params = {"row": name, "dataset": dataset, "profile": profile, "seed": seed}
        out = folder / f"{name}-s{seed}.ipynb"
        done.append(execute(template(ROW_TEMPLATES[kind]), out, params, f"row {name} (seed {seed})"))
    return done


def run_pages(profile: str, dataset: str | None, seeds: list[int], book_dir: Path | None = None,
              pages=PAGES, say=None) -> list[Path]:
    """Execute the book's page notebooks and copy them into `book_dir` (default book/) once all
    of them succeeded: a failure leaves book/ as it was and keeps the failed notebook under
    results/<dataset>-<profile>/notebooks/failed-<page>.ipynb."""
    from .results import results_dir
    book_dir = Path(book_dir or _root() / "book")
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
            _tidy(Path(tmp) / f"{page}.ipynb", template(page), book_dir / f"{page}.ipynb")
            shutil.copyfile(Path(tmp) / f"{page}.ipynb", book_dir / f"{page}.ipynb")
    return [book_dir / f"{page}.ipynb" for page in pages]


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
        raise FmpaperError(f"jupyter-book build failed ({len(lines)} problem(s)); first: {_first_line(lines[0])}")
    return Path(output or root) / "_build" / "html"


def reproduce(profile: str = "quick", dataset: str | None = None, seeds=1, rows=None, book: bool = True,
              progress: bool = True) -> dict:
    """Every row (for seeds 0..seeds-1) through its notebook, then the book (unless book=False:
    then only the result tables are written). Returns what was written."""
    from .results import check_params, results_dir, write_tables
    if profile not in PROFILES:
        raise FmpaperError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    p = check_params(dataset=dataset, profile=profile, seeds=seeds)
    seed_list = p["seeds"]
    dataset = dataset or make_config(profile).dataset  # explicit in every executed notebook
    _row_plan(rows, seed_list)  # validate before anything runs
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, flush=True)) if progress else (lambda msg: None)
    say(f"fmpaper reproduce: profile {profile}, dataset {p['dataset']}, seeds {seed_list}")
    notebooks = run_rows(profile, dataset, seed_list, rows, progress)
    say(f"rows done: executed notebooks in {results_dir(dataset, profile) / 'notebooks'}")
    out = {"rows": notebooks, "pages": [], "html": None}
    if not book:
        write_tables(dataset, profile, seed_list)
        say(f"tables written to {results_dir(dataset, profile)}")
        return out
    out["pages"] = run_pages(profile, dataset, seed_list, say=say)
    say("building the book (jupyter-book build book/ -W -n --keep-going) ...")
    out["html"] = build_book()
    say(f"done in {time.perf_counter() - t0:.0f} s; open {out['html'] / 'index.html'}")
    return out
