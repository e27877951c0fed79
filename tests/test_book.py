"""The book as committed: a strict build from the repository root, its pages, images and looks.

The notebooks in book/ are pre-executed, so the build computes nothing and needs no runs.
"""
import json
import os
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from fmpaper.reproduce import jupyter_book, toc_files

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'class="output traceback', "ansi-red-fg\">---",
                     "FmpaperError:")


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """`jupyter-book build book/ -W -n --keep-going`, run from the root, into a temporary folder."""
    out = tmp_path_factory.mktemp("book-build")
    cmd = jupyter_book() + ["build", "book/", "-W", "-n", "--keep-going", "--path-output", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    return out / "_build" / "html"


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.extend(v for k, v in attrs if k == "src" and v)


def pages(html: Path) -> list[Path]:
    return [p for p in html.rglob("*.html") if "_static" not in p.parts]


def test_config_and_toc_are_found_from_the_root():
    assert (ROOT / "_config.yml").is_file() and (ROOT / "_toc.yml").is_file()
    link = ROOT / "book" / "_toc.yml"
    assert link.is_symlink() and link.resolve() == (ROOT / "_toc.yml").resolve()
    assert not (ROOT / "book" / "_config.yml").exists()  # one configuration: the root one
    for f in toc_files():
        assert any((ROOT / "book" / f"{f}{ext}").is_file() for ext in (".md", ".ipynb")), f


def test_every_toc_page_is_built(html):
    for f in toc_files():
        assert (html / f"{f}.html").is_file(), f


def test_no_page_holds_a_traceback(html):
    for page in pages(html):
        text = page.read_text(encoding="utf-8")
        for marker in TRACEBACK_MARKERS:
            assert marker not in text, f"{page.relative_to(html)} holds {marker!r}"


def test_every_referenced_image_exists(html):
    counts = {}
    for page in pages(html):
        parser = Images()
        parser.feed(page.read_text(encoding="utf-8"))
        for src in parser.srcs:
            url = urlparse(src)
            if url.scheme in ("http", "https", "data"):
                continue
            target = (page.parent / unquote(url.path)).resolve()
            assert target.is_file(), f"{page.relative_to(html)} references missing {src}"
            counts[page.stem] = counts.get(page.stem, 0) + 1
    assert counts.get("figures", 0) >= 5 and counts.get("data", 0) >= 1, counts


def test_result_pages_are_labelled(html):
    executed = [f for f in toc_files() if (ROOT / "book" / f"{f}.ipynb").is_file()]
    assert len(executed) >= 5, executed
    for name in executed:
        text = (html / f"{name}.html").read_text(encoding="utf-8")
        assert "Notebook executed" in text and "profile" in text, name
        if not name.endswith("data"):
            assert "Provenance: dataset" in text, name


def chromium(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """Headless Chromium with a throw-away profile; skips the test where it is not installed."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)))
    assert run.returncode == 0, run.stderr[-2000:]
    return run


# after the page has loaded: every table wider than the notebook output that holds it, written
# into an attribute of <body> for --dump-dom to carry out
WIDTH_PROBE = """<script>
window.addEventListener('load', () => {
  const wide = [];
  document.querySelectorAll('.cell_output table').forEach((t) => {
    const box = t.closest('.cell_output').getBoundingClientRect().width, w = t.getBoundingClientRect().width;
    if (w > box + 1) wide.push(Math.round(w) + ' px in ' + Math.round(box) + ' px: ' + t.textContent.trim().slice(0, 60));
  });
  document.body.setAttribute('data-wide-tables', JSON.stringify(wide));
});
</script>"""


def test_tables_fit_a_1400_px_window(html, tmp_path):
    executed = [f for f in toc_files() if (ROOT / "book" / f"{f}.ipynb").is_file()]
    for name in executed:
        probe = html / f"{name}.probe.html"              # beside the page, so its styles load
        probe.write_text((html / f"{name}.html").read_text(encoding="utf-8").replace("</body>", WIDTH_PROBE + "</body>"),
                         encoding="utf-8")
        try:
            run = chromium(tmp_path, "--window-size=1400,1000", "--virtual-time-budget=10000", "--dump-dom",
                           probe.as_uri())
        finally:
            probe.unlink()
        found = re.search(r'data-wide-tables="([^"]*)"', run.stdout)
        assert found, f"{name}: the width probe did not run"
        wide = json.loads(unescape(found.group(1)))
        assert not wide, f"{name}: tables wider than the page at 1400 px: {wide}"


def test_index_screenshot_in_headless_chromium(html, tmp_path):
    shot = tmp_path / "index.png"
    chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", (html / "index.html").as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("FMPAPER_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
