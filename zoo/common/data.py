"""Data helpers shared by the project loaders.

`require_files` turns a missing dataset into an error that says what to put where, before
any work starts. Every loader calls it first, e.g.::

    require_files(cfg.data.root, ["cifar-10-batches-py/data_batch_1", ...],
                  layout="CIFAR-10 python version: <root>/cifar-10-batches-py/{data_batch_1..5,"
                         " test_batch, batches.meta} (tar xzf cifar-10-python.tar.gz -C <root>)")
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


class MissingDataError(FileNotFoundError):
    """A dataset is not where ``data.root`` points; the message gives the expected layout."""


def require_files(root: str | Path | None, relative_paths: Iterable[str], layout: str,
                  option: str = "data.root") -> Path:
    """Returns ``Path(root)`` when every ``root/<relative path>`` exists, else raises.

    The error names the option to set, the missing files (first ten) and ``layout``, a
    short description of the expected tree and where the files come from.
    """
    relative_paths = list(relative_paths)
    if root in (None, "", "???"):
        raise MissingDataError(
            f"{option} is not set. Expected layout: {layout}\n"
            f"Set it on the command line, e.g. {option}=/path/to/dataset")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingDataError(
            f"{option}={str(root)!r} is not a directory. Expected layout: {layout}")
    missing = [p for p in relative_paths if not (root / p).exists()]
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MissingDataError(
            f"{option}={str(root)!r} lacks {len(missing)} of {len(relative_paths)} expected files:\n  {shown}\n"
            f"Expected layout: {layout}")
    return root
