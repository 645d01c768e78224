"""Metric logging: ``metrics.jsonl`` always, wandb (offline by default), DEQ diagnostics.

Only the main rank writes. wandb is imported only when ``logger.wandb.mode`` is not
``disabled``; ``offline`` writes its files under ``<run dir>/wandb`` and needs no account
(sync later with ``wandb sync``), ``online`` streams to the account of ``wandb login``.
"""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

#: Keys of a `core` solver / DEQ ``info`` dict that become scalar diagnostics.
DEQ_SCALAR_KEYS = ("abs_lowest", "rel_lowest", "nstep", "nfe", "n_fallback", "sradius")


def _scalar(value: Any) -> float | None:
    """A float for numbers and tensors (mean over elements); None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.detach().float().mean())
    return None


def deq_metrics(info: Mapping[str, Any] | None, prefix: str = "deq/") -> dict[str, float]:
    """Scalar diagnostics from a DEQ ``info`` dict: per-sample values become their mean.

    ``abs_lowest``/``rel_lowest`` (final residuals), ``nstep`` (solver steps), ``nfe``
    (function evaluations), ``n_fallback`` (samples the safety net froze) and ``sradius``
    (spectral radius, kept when ``sradius_mode`` computed it, i.e. when positive). Traces are not scalars and are
    summarised by their last column (the residual at the last step taken).
    """
    if not info:
        return {}
    out: dict[str, float] = {}
    for key in DEQ_SCALAR_KEYS:
        if key in info:
            value = _scalar(info[key])
            # core reports sradius as a placeholder (<= 0) unless sradius_mode asked for it
            if value is not None and not (key == "sradius" and value <= 0.0):
                out[prefix + key] = value
    for key in ("abs_trace", "rel_trace"):
        trace = info.get(key)
        if isinstance(trace, torch.Tensor) and trace.dim() == 2 and trace.shape[1] > 0:
            out[prefix + key.replace("_trace", "_last")] = float(trace.detach()[:, -1].float().mean())
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def to_loggable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors -> floats (means), drop non-scalars; keeps ints, floats, bools and strings."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, str):
            out[key] = value
            continue
        scalar = _scalar(value)
        if scalar is not None:
            out[key] = int(value) if isinstance(value, int) and not isinstance(value, bool) else scalar
    return out


class MetricLogger:
    """Appends one JSON line per `log` call to ``metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, out_dir: Path | str, *, enabled: bool = True, wandb_mode: str = "offline",
                 wandb_project: str = "deq-zoo", wandb_entity: str | None = None,
                 run_name: str | None = None, config: Mapping[str, Any] | None = None,
                 tags: list[str] | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._wandb_run = None
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode={wandb_mode!r}: use offline, online or disabled")
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb

            self._wandb_run = wandb.init(
                mode=wandb_mode, dir=str(out_dir), project=wandb_project, entity=wandb_entity,
                name=run_name, config=dict(config or {}), tags=list(tags or []), reinit="finish_previous",
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes ``{"step": step, **metrics}``; returns the logged (scalarised) record."""
        record = {"step": int(step), **to_loggable(metrics)}
        if not self.enabled:
            return record
        self._file.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in record.items()}) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=int(step))
        return record

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        self.enabled = False


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
