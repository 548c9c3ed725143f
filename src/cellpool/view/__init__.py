"""What users see while work runs: a text line in a terminal (a widget in a notebook)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .text import TextProgress

if TYPE_CHECKING:
    from ..dispatch import Run

PROGRESS_MODES = ("auto", "text", "none")


def normalize_progress(progress: str | bool) -> str:
    """``True``/``False`` mean ``"auto"``/``"none"``; anything unknown is a ``ValueError``."""
    if progress is True:
        return "auto"
    if progress is False or progress is None:
        return "none"
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {progress!r}")
    return progress


def make_view(progress: str, run: Run, label: str) -> TextProgress | None:
    """The view ``progress`` asks for here, or ``None`` for no display."""
    if progress == "auto":
        progress = "text" if sys.stderr is not None and sys.stderr.isatty() else "none"
    if progress == "text":
        return TextProgress(run, label, sys.stderr)
    return None
