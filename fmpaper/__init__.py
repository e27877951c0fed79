"""fmpaper: reproducible companion of "Fisher-Weighted Merge of Contrastive Learning Models
in Sequential Recommendation" (Ryu, Jeon, Cho, Kang; ICML 2023 workshop)."""

__version__ = "0.1.0"


class FmpaperError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""


def first_line(text) -> str:
    """The first non-blank line of a message (or of an exception's text), for one-line errors."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if lines:
        return lines[0]
    return type(text).__name__ if isinstance(text, BaseException) else ""
