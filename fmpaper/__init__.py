"""fmpaper: reproducible companion of "Fisher-Weighted Merge of Contrastive Learning Models
in Sequential Recommendation" (Ryu, Jeon, Cho, Kang; ICML 2023 workshop)."""

import os
from contextlib import contextmanager

__version__ = "0.1.0"


class FmpaperError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""


def first_line(text) -> str:
    """The first non-blank line of a message (or of an exception's text), for one-line errors."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if lines:
        return lines[0]
    return type(text).__name__ if isinstance(text, BaseException) else ""


@contextmanager
def environment(values: dict):
    """Within the block, os.environ holds `values` (str -> str); processes started in it inherit
    them. Each variable gets back its earlier value, or is removed if it had none."""
    saved = {var: os.environ.get(var) for var in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
