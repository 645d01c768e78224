"""What a run prints: one plain line per logging step, a summary line, and ``train.log``.

Without a terminal (a SLURM log, ``> out``) every ``log.every`` steps one line::

    [mdeq/digits] step 40/460 loss 0.512 lr 2.91e-03 train/top1 84.4 test/top1 97.2 deq/abs 1.2e-03 nfe 8.0 0.31 s/step

With a terminal the tqdm bar shows the loss and the DEQ residual instead, and stays on
screen. At the end one summary line gives the final metrics, the run directory and the
wall time. `ConsoleLog` copies everything that goes to stdout and stderr during a run
into ``<run dir>/train.log``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, TextIO

LOSS_KEYS = ("train/loss", "loss")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def metric_keys(record: Mapping[str, Any]) -> list[str]:
    """The non-loss train/*, test/*, val/* metrics of a record, in order."""
    return [k for k in record if k.split("/")[0] in ("train", "test", "val", "valid") and k not in LOSS_KEYS
            and isinstance(record[k], (int, float))]


def step_line(tag: str, step: int, total: int, record: Mapping[str, Any],
              last_eval: Mapping[str, Any] | None = None) -> str:
    """The plain line of one logging step (see the module docstring)."""
    parts = [f"[{tag}] step {step}/{total}"]
    loss = next((record[k] for k in LOSS_KEYS if k in record), None)
    if loss is not None:
        parts.append(f"loss {_fmt(float(loss))}")
    if record.get("lr") is not None:
        parts.append(f"lr {float(record['lr']):.2e}")
    for key in metric_keys(record)[:2]:
        parts.append(f"{key} {_fmt(float(record[key]))}")
    for key in metric_keys(last_eval or {})[:1]:
        parts.append(f"{key} {_fmt(float(last_eval[key]))}")
    if record.get("deq/abs_lowest") is not None:
        parts.append(f"deq/abs {float(record['deq/abs_lowest']):.1e}")
    if record.get("deq/nfe") is not None:
        parts.append(f"nfe {float(record['deq/nfe']):.1f}")
    if record.get("time/step_s") is not None:
        parts.append(f"{float(record['time/step_s']):.3g} s/step")
    return " ".join(parts)


def bar_postfix(record: Mapping[str, Any]) -> dict[str, str]:
    """What the tqdm bar shows: the loss and the DEQ residual."""
    out = {}
    loss = next((record[k] for k in LOSS_KEYS if k in record), None)
    if loss is not None:
        out["loss"] = _fmt(float(loss))
    if record.get("deq/abs_lowest") is not None:
        out["res"] = f"{float(record['deq/abs_lowest']):.1e}"
    return out


def summary_line(tag: str, status: str, metrics: Mapping[str, Any], out_dir: Path, wall_s: float) -> str:
    """The last line of a run: its status, final metrics, run directory and wall time."""
    shown = " ".join(f"{k} {_fmt(float(v))}" for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith(("time/", "mem/")))
    return f"[{tag}] {status}: {shown} | run dir {out_dir} | wall time {wall_s:.1f} s"


class _Tee:
    def __init__(self, stream: TextIO, log: TextIO):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._log.flush()
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


class ConsoleLog:
    """Copies stdout and stderr into `path` (appending) until `close`."""

    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)

    def close(self) -> None:
        if self._file.closed:
            return
        if isinstance(sys.stdout, _Tee) and sys.stdout._log is self._file:
            sys.stdout, sys.stderr = self._saved
        self._file.close()
