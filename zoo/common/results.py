"""``results.json``: what a run reproduced, under which code and hardware.

Fields (all runs)::

    project, experiment, seed, status ("completed" | "preempted" | "evaluated"),
    metrics          final metrics (floats), e.g. {"test/top1": 85.3}
    reported         the experiment's ``reported:`` block (paper table, row id, metric)
    deq              DEQ diagnostics of the final evaluation (nfe, nstep, abs/rel residual)
    wall_time_s, steps (this session's), final_step, time_per_step_s (data + train step),
    peak_memory_mb
    git_commit, git_dirty, versions {python, torch, cuda, cudnn, numpy}, device {type, name, count}
    world_size, config_path (the resolved config beside it), run_dir, checkpoint, created

`scripts/compare_tables.py` reads these files and matches ``reported.table``/``reported.row``
to the rows of ``configs/paper_tables.yaml``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from zoo.common.logger import to_loggable

REQUIRED_FIELDS = ("project", "experiment", "seed", "status", "metrics", "reported", "deq",
                   "wall_time_s", "time_per_step_s", "peak_memory_mb", "git_commit", "versions",
                   "device", "config_path")


def git_commit(repo: Path | str | None = None) -> tuple[str | None, bool | None]:
    """(commit hash, dirty flag) of the repository holding this code; (None, None) outside git."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions (python, torch, CUDA, cuDNN, numpy) and the device a run used."""
    device = device or torch.device("cpu")
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(device),
               "count": torch.cuda.device_count(),
               "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
    else:
        dev = {"type": device.type, "name": platform.processor() or platform.machine(),
               "count": os.cpu_count()}
    return {"versions": versions, "device": dev, "hostname": platform.node()}


def _plain(value: Any) -> Any:
    """JSON-ready copy: DictConfig -> dict, tensors -> floats, NaN/inf -> None."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = float(value.detach().float().mean()) if value.numel() else None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_results(*, project: str, experiment: str, seed: int, metrics: Mapping[str, Any],
                  reported: Any = None, deq_stats: Mapping[str, Any] | None = None,
                  wall_time_s: float | None = None, steps: int | None = None,
                  peak_memory_mb: float | None = None, device: torch.device | None = None,
                  status: str = "completed", extra: Mapping[str, Any] | None = None,
                  **fields: Any) -> dict[str, Any]:
    """The ``results.json`` dict (see the module docstring); ``fields`` are added as given."""
    commit, dirty = git_commit()
    env = environment_info(device)
    record = {
        "project": project,
        "experiment": experiment,
        "seed": seed,
        "status": status,
        "metrics": to_loggable(metrics),
        "reported": _plain(reported),
        "deq": to_loggable(deq_stats or {}),
        "wall_time_s": wall_time_s,
        "steps": steps,
        "time_per_step_s": (wall_time_s / steps) if wall_time_s and steps else None,
        "peak_memory_mb": peak_memory_mb,
        "git_commit": commit,
        "git_dirty": dirty,
        **env,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    record.update({k: _plain(v) for k, v in fields.items()})
    if extra:
        record["extra"] = _plain(extra)
    return _plain(record)


def write_results(path: Path | str, record: Mapping[str, Any]) -> Path:
    """Writes ``record`` as indented JSON, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
