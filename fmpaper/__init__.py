"""fmpaper: reproducible companion of "Fisher-Weighted Merge of Contrastive Learning Models
in Sequential Recommendation" (Ryu, Jeon, Cho, Kang; ICML 2023 workshop)."""

__version__ = "0.1.0"


class FmpaperError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""
