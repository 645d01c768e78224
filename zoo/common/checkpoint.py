"""Atomic, verified, resumable checkpoints.

A checkpoint is ``<run dir>/checkpoints/step_<step:08d>.pt`` (``torch.save`` of a dict)
plus a sidecar ``.sha256`` holding its size and SHA-256. Writing goes to a temporary file
in the same folder, is flushed to disk, then renamed (``os.replace``), and only then the
sidecar is written the same way: a checkpoint without a matching sidecar is an
interrupted write, one whose bytes no longer match is corrupt, and both are skipped by
`latest_valid` in favour of the previous checkpoint. The last ``keep`` are kept.

`rng_state` / `set_rng_state` capture torch, CUDA, numpy and ``random`` states so that a
resumed run draws the same numbers as one never interrupted.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """The states of every random generator a training step may draw from."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` captured (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: dict[str, Any], path: Path | str) -> Path:
    """Writes ``state`` atomically to ``path`` with its checksum sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    _write_atomic(path, data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _write_atomic(_sidecar(path), json.dumps(meta).encode())
    return path


def verify_checkpoint(path: Path | str) -> bool:
    """True when ``path`` and its sidecar exist and the bytes match size and SHA-256."""
    path = Path(path)
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    if path.stat().st_size != meta.get("size"):
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == meta.get("sha256")


def load_checkpoint(path: Path | str, map_location: Any = "cpu", verify: bool = True) -> dict[str, Any]:
    """Loads a checkpoint file (or the latest valid one of a run dir / checkpoints dir).

    Raises ``ValueError`` when a file fails its checksum and ``FileNotFoundError`` when a
    folder holds no valid checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_valid(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint (step_*.pt with its .sha256) under {path}")
        path = found
    if verify and _sidecar(path).exists() and not verify_checkpoint(path):
        raise ValueError(f"checkpoint {path} is truncated or corrupt (size/SHA-256 mismatch)")
    return torch.load(path, map_location=map_location, weights_only=False)


def list_checkpoints(folder: Path | str) -> list[Path]:
    """``step_*.pt`` files of a folder, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid(folder: Path | str) -> Path | None:
    """The newest checkpoint of ``folder`` that passes `verify_checkpoint`."""
    for path in reversed(list_checkpoints(folder)):
        if verify_checkpoint(path):
            return path
    return None


class CheckpointManager:
    """Saves ``step_<n>.pt`` into one folder, keeps the last ``keep``, finds the newest valid.

    ``enabled=False`` (non-main ranks) turns `save` into a no-op; loading works everywhere.
    """

    def __init__(self, folder: Path | str, *, keep: int = 3, enabled: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: keep at least one checkpoint")
        self.folder = Path(folder)
        self.keep = keep
        self.enabled = enabled

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def save(self, state: dict[str, Any], step: int) -> Path | None:
        """Writes ``state`` as the checkpoint of ``step`` and prunes old ones (main rank only)."""
        if not self.enabled:
            return None
        path = save_checkpoint(state, self.path_for(step))
        for old in list_checkpoints(self.folder)[:-self.keep]:
            old.unlink(missing_ok=True)
            _sidecar(old).unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        return latest_valid(self.folder)
