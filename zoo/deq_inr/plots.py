"""The pictures of a DEQ-INR run: the PSNR curve and the reconstruction (image, waveform, frames).

`save_pictures(out_dir, signal, name, pred, metrics, baselines)` writes, into the run dir,
``psnr_curve.png`` (training PSNR against steps and against training time, the model from
``metrics.jsonl`` and each baseline from its curve) and, for images,
``reconstruction.png`` (target, model, baselines and the model's error map, each PSNR in
its title), for audio ``waveform.png`` (target and reconstructions, whole and a 20 ms
window), for video ``frames.png`` (a strip of frames: target and reconstructions).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from zoo.common import read_metrics
from zoo.deq_inr.data import Signal


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _unit(values: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """[-1, 1] values -> [0, 1] numpy array of the grid shape."""
    return ((values.detach().float().cpu().reshape(shape) + 1) / 2).clamp(0, 1).numpy()


def psnr_curve(out_dir: Path, name: str, baselines: Mapping[str, Mapping[str, Any]]) -> Path:
    plt = _plt()
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "train/psnr" in r and "time/train_s" in r]
    curves = {name: rows, **{a: b["curve"] for a, b in baselines.items()}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, curve in curves.items():
        if not curve:
            continue
        psnrs = [r["train/psnr"] for r in curve]
        axes[0].plot([r["step"] for r in curve], psnrs, label=label)
        axes[1].plot([r["time/train_s"] for r in curve], psnrs, label=label)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training time (s)")
    for ax in axes:
        ax.set_ylabel("train PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{out_dir.parent.name}: PSNR during training")
    return _save(plt, fig, out_dir / "psnr_curve.png")


def reconstruction(out_dir: Path, signal: Signal, panels: list[tuple[str, Optional[torch.Tensor], float]]
                   ) -> Path:
    """Image: target, each prediction and the first prediction's error map."""
    plt = _plt()
    shape = signal.test_shape
    target = _unit(signal.test_values, shape)
    shown = [(f"target ({shape[0]}x{shape[1]})", target)]
    shown += [(f"{label}: {value:.2f} dB", _unit(pred, shape)) for label, pred, value in panels if pred is not None]
    error = None
    if panels and panels[0][1] is not None:
        error = np.abs(_unit(panels[0][1], shape) - target).mean(-1)
    n = len(shown) + (error is not None)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4))
    axes = np.atleast_1d(axes)
    grey = shape[-1] == 1
    for ax, (title, image) in zip(axes, shown):
        ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    if error is not None:
        im = axes[-1].imshow(error, cmap="inferno")
        axes[-1].set_title(f"|error| of {panels[0][0]}", fontsize=9)
        fig.colorbar(im, ax=axes[-1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    return _save(plt, fig, out_dir / "reconstruction.png")


def waveform(out_dir: Path, signal: Signal, panels: list[tuple[str, Optional[torch.Tensor], float]]) -> Path:
    """Audio: the whole waveform and a 20 ms window from its middle."""
    plt = _plt()
    rate = signal.sample_rate or 1
    t = np.arange(len(signal.test_values)) / rate
    mid, half = len(t) // 2, max(int(0.01 * rate), 1)
    window = slice(mid - half, mid + half)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6))
    series = [("target", signal.test_values, None)] + [p for p in panels if p[1] is not None]
    for label, values, value in series:
        y = values.detach().float().cpu().flatten().numpy()
        text = label if value is None else f"{label}: {value:.2f} dB"
        axes[0].plot(t, y, lw=0.4, label=text, alpha=0.8)
        axes[1].plot(t[window], y[window], lw=1.0, label=text)
    axes[0].set_title("waveform (peak-normalised)")
    axes[1].set_title("20 ms window")
    for ax in axes:
        ax.set_xlabel("time (s)")
        ax.legend(fontsize=8)
    return _save(plt, fig, out_dir / "waveform.png")


def frames(out_dir: Path, signal: Signal, panels: list[tuple[str, Optional[torch.Tensor], float]],
           n_frames: int = 6) -> Path:
    """Video: `n_frames` evenly spaced frames, one row per target / prediction."""
    plt = _plt()
    shape = signal.test_shape
    picks = np.linspace(0, shape[0] - 1, min(n_frames, shape[0])).astype(int)
    rows = [("target", _unit(signal.test_values, shape))]
    rows += [(f"{label}: {value:.2f} dB", _unit(pred, shape)) for label, pred, value in panels if pred is not None]
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(1.6 * len(picks), 2.2 * len(rows)), squeeze=False)
    for r, (title, video) in enumerate(rows):
        for c, k in enumerate(picks):
            axes[r, c].imshow(video[k].squeeze(-1) if shape[-1] == 1 else video[k], vmin=0, vmax=1)
            axes[r, c].axis("off")
            if c == 0:
                axes[r, c].set_title(title, fontsize=8, loc="left")
    return _save(plt, fig, out_dir / "frames.png")


def save_pictures(out_dir: Path | str, signal: Signal, name: str, pred: Optional[torch.Tensor],
                  metrics: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """All pictures of a finished run (see the module docstring)."""
    out_dir = Path(out_dir)
    panels = [(name, pred, float(metrics.get("test/psnr", float("nan"))))]
    panels += [(a, b.get("pred"), float(b["test/psnr"])) for a, b in baselines.items()]
    draw = {"image": reconstruction, "audio": waveform, "video": frames}[signal.kind]
    return [psnr_curve(out_dir, name, baselines), draw(out_dir, signal, panels)]
