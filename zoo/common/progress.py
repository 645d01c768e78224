"""tqdm progress bars that stay quiet in logs.

A bar is drawn only on the main rank, when stdout is a terminal and ``log.progress`` is
true, and stays on screen when done; otherwise the iterable is returned unchanged (no
tqdm overhead, no control characters in SLURM logs: `Run.fit` prints plain lines there).
"""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled(requested: bool = True, is_main: bool = True) -> bool:
    """True when a bar should be drawn: asked for, main rank, and stdout is a terminal."""
    return bool(requested) and is_main and sys.stdout.isatty()


def progress(iterable: Iterable[T], total: int | None = None, desc: str | None = None,
             enabled: bool = True, initial: int = 0) -> Iterable[T]:
    """``tqdm(iterable)`` when ``enabled``, else ``iterable`` itself."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=True)
