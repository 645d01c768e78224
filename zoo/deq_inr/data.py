"""Signals for implicit neural representations: images, videos and audio as (coordinate, value) sets.

`build_datasets(cfg.data, work_dir)` returns a `Signal`: training and test coordinates in
[-1, 1] (one column per axis: (row, col) for images, (t, row, col) for video, (t,) for
audio) and values mapped from [0, 1] to [-1, 1] (audio: the peak-normalised waveform,
already in [-1, 1]). Sources (``data.kind``):

* ``image`` (``data.image``): a scikit-image sample by name (``camera``, ``astronaut``,
  ``text``, ``coins``, ...; only those that ship in the wheel), scikit-learn's
  ``china.jpg`` / ``flower.jpg``, any image file path, or the original repository's files
  under ``data.root`` (``div2k``: ``image/data_div2k.npz``, ``text2d``:
  ``image/data_2d_text.npz``, both ``test_data`` uint8 (n, 512, 512, 3); ``celeba``:
  ``image/celeba_128_tiny.npy`` uint8 (n, 128, 128, 3)), picked by ``data.index``. The
  image is centre-cropped to a square and resized to ``data.size``; ``data.grey`` forces
  one channel (true) or RGB (false), null keeps the image's own.
  ``data.protocol=generalization``: train on the even pixels ``[::2, ::2]``, test on the
  odd ones ``[1::2, 1::2]`` (the paper's Nature / Text protocol); ``full``: both are the
  whole grid.
* ``video`` (``data.video``): the frames of a GIF or video file (imageio), e.g.
  ``skimage_gif`` (scikit-image's 24-frame ``no_time_for_that_tiny.gif``) or upstream's
  ``video/cat_video.mp4`` under ``data.root`` (mp4 needs ``pip install av``); train = test.
* ``audio`` (``data.audio``): a WAV file (soundfile, else scipy), e.g. upstream's
  ``audio/gt_bach.wav`` under ``data.root``, mixed to mono and divided by its peak; ``synthetic`` writes `synthetic_audio` to ``<work_dir>/synthetic.wav`` and
  reads it back through the same loader.

PSNR (`psnr`) is ``-10 log10(MSE)`` with peak 1 on values mapped back to [0, 1] and
clamped: for images and video, on the pixel intensities; for audio, on the
peak-normalised waveform mapped from [-1, 1] to [0, 1].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from zoo.common import MissingDataError, require_files

#: data.image names read from the original repository's files under data.root.
REPO_FILES = {"div2k": "image/data_div2k.npz", "text2d": "image/data_2d_text.npz",
              "celeba": "image/celeba_128_tiny.npy"}
REPO_LAYOUT = ("<data.root>/image/data_div2k.npz and image/data_2d_text.npz (keys train_data / "
               "test_data, uint8 (n, 512, 512, 3)), image/celeba_128_tiny.npy (uint8 (n, 128, 128, 3)): "
               "the data/ folder of the (Implicit)^2 repository (locuslab/ImpSq)")
SKLEARN_IMAGES = ("china.jpg", "flower.jpg")
#: scikit-image samples that ship inside the wheel (the others need a download).
SKIMAGE_IMAGES = ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea",
                  "clock", "coffee", "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
                  "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
                  "shepp_logan_phantom", "text")
SKIMAGE_GIF = "no_time_for_that_tiny.gif"


@dataclass
class Signal:
    """One signal as coordinate/value pairs (see the module docstring for the conventions)."""

    kind: str                       # image | video | audio
    name: str
    train_coords: torch.Tensor      # (N, in_features) in [-1, 1]
    train_values: torch.Tensor      # (N, out_features) in [-1, 1]
    test_coords: torch.Tensor
    test_values: torch.Tensor
    train_shape: tuple[int, ...]    # grid shape of the training set, channels last
    test_shape: tuple[int, ...]
    resolution: int = 0             # the longest side of the full grid (before the protocol's split)
    sample_rate: Optional[int] = None   # audio

    @property
    def in_features(self) -> int:
        return self.train_coords.shape[1]

    @property
    def out_features(self) -> int:
        return self.train_values.shape[1]


# ----------------------------------------------------------------------------- metric
def psnr(pred: torch.Tensor, target: torch.Tensor, dims: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """PSNR (dB, peak 1) of predictions against targets, both in the [-1, 1] training range.

    Both are mapped to [0, 1] (``(v + 1) / 2``), the prediction is clamped, and the MSE is
    taken over `dims` (default: all elements, a scalar).
    """
    p = ((pred.detach().float() + 1) / 2).clamp(0, 1)
    t = (target.detach().float() + 1) / 2
    err = (p - t).square()
    mse = err.mean() if dims is None else err.mean(dim=dims)
    return -10 * torch.log10(mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------- grids
def coordinate_grid(shape: tuple[int, ...]) -> torch.Tensor:
    """Coordinates of a grid: ``linspace(-1, 1, n)`` per axis, as (prod(shape), len(shape))."""
    axes = [torch.linspace(-1, 1, n) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def _to_unit(array: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float arrays to float32 in [0, 1]."""
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    array = array.astype(np.float32)
    return array / 255.0 if array.max() > 1.0 else array


def square_resize(image: np.ndarray, size: Optional[int]) -> np.ndarray:
    """Centre-crops (H, W, C) floats to a square and resizes it to size x size (anti-aliased)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top:top + s, left:left + s]
    if size and int(size) != s:
        from skimage.transform import resize

        image = resize(image, (int(size), int(size)), order=3, anti_aliasing=int(size) < s,
                       preserve_range=True).clip(0, 1).astype(np.float32)
    return image


# ----------------------------------------------------------------------------- images
def read_image(name: str, root: Optional[str] = None, index: int = 0) -> np.ndarray:
    """The image `name` (module docstring) as float32 (H, W, C) in [0, 1]."""
    name = str(name)
    if name in REPO_FILES:
        rel = REPO_FILES[name]
        path = require_files(root, [rel], REPO_LAYOUT) / rel
        if path.suffix == ".npz":
            with np.load(path) as archive:
                if "test_data" not in archive:
                    raise MissingDataError(f"{path} has no 'test_data' array (keys: {list(archive.keys())})")
                images = archive["test_data"]
        else:
            images = np.load(path)
        if not 0 <= index < len(images):
            raise ValueError(f"data.index={index}: {path} holds {len(images)} images")
        array = images[index]
    elif name in SKLEARN_IMAGES:
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name)
    elif name in SKIMAGE_IMAGES:
        import skimage.data

        array = getattr(skimage.data, name)()
    elif os.path.isfile(name):
        import imageio.v3 as iio

        array = iio.imread(name)
    else:
        raise MissingDataError(
            f"data.image={name!r} is neither an image file nor a known name: scikit-image samples "
            f"{', '.join(SKIMAGE_IMAGES)}; scikit-learn {', '.join(SKLEARN_IMAGES)}; under data.root "
            f"{', '.join(REPO_FILES)}")
    array = _to_unit(np.asarray(array))
    if array.ndim == 2:
        array = array[..., None]
    return array[..., :3]  # drop alpha


def _channels(image: np.ndarray, grey: Optional[bool]) -> np.ndarray:
    if grey is None:
        return image
    if grey and image.shape[-1] == 3:
        return (image @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))[..., None]
    if not grey and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image


def grid_signal(kind: str, name: str, values: np.ndarray, protocol: str = "full",
                sample_rate: Optional[int] = None) -> Signal:
    """A Signal from a grid of [0, 1] values (..., C) (audio: [-1, 1] already).

    ``protocol=generalization`` (2-D grids): train on ``[::2, ::2]``, test on ``[1::2, 1::2]``.
    """
    grid = values.shape[:-1]
    coords = coordinate_grid(grid).reshape(*grid, len(grid))
    target = torch.from_numpy(np.ascontiguousarray(values)).float()
    if kind != "audio":
        target = target * 2 - 1
    if protocol == "generalization":
        if len(grid) != 2:
            raise ValueError("data.protocol=generalization needs a 2-D image")
        parts = [(coords[o::2, o::2], target[o::2, o::2]) for o in (0, 1)]
    elif protocol == "full":
        parts = [(coords, target)] * 2
    else:
        raise ValueError(f"data.protocol={protocol!r}: use full or generalization")
    (tc, tv), (ec, ev) = parts
    return Signal(kind, name, tc.reshape(-1, len(grid)), tv.reshape(-1, values.shape[-1]),
                  ec.reshape(-1, len(grid)), ev.reshape(-1, values.shape[-1]),
                  tuple(tv.shape), tuple(ev.shape), max(grid), sample_rate)


# ----------------------------------------------------------------------------- video
def read_video(path: str, max_frames: Optional[int] = None) -> np.ndarray:
    """Frames of a GIF / video file as float32 (T, H, W, C) in [0, 1]; ``skimage_gif`` is
    scikit-image's tiny GIF."""
    import imageio.v3 as iio

    if path == "skimage_gif":
        import skimage.data

        path = os.path.join(skimage.data.data_dir, SKIMAGE_GIF)
    if not os.path.isfile(path):
        raise MissingDataError(f"data.video={path!r}: no such file (a GIF, or a video imageio can read)")
    frames = _to_unit(np.asarray(iio.imread(path, index=None)))
    if frames.ndim == 3:  # grey frames
        frames = frames[..., None]
    return frames[:max_frames, ..., :3] if max_frames else frames[..., :3]


# ----------------------------------------------------------------------------- audio
def synthetic_audio(seconds: float = 3.0, sample_rate: int = 16000) -> np.ndarray:
    """A test signal in [-1, 1]: three notes (A4, C#5, E5) with 3 harmonics each, one after
    another with an attack/decay envelope, over a chirp from 200 Hz to 2 kHz."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    signal = np.zeros_like(t)
    note_len = seconds / 3
    for k, f0 in enumerate((440.0, 554.37, 659.25)):
        local = t - k * note_len
        inside = (local >= 0) & (local < note_len)
        env = np.where(inside, np.minimum(local / 0.02, 1.0) * np.exp(-3.0 * np.clip(local, 0, None)), 0.0)
        for h, a in enumerate((1.0, 0.5, 0.25)):
            signal += env * a * np.sin(2 * np.pi * f0 * (h + 1) * t)
    f_start, f_end = 200.0, 2000.0
    phase = 2 * np.pi * (f_start * t + (f_end - f_start) / (2 * seconds) * t ** 2)
    signal += 0.3 * np.sin(phase)
    return (signal / np.abs(signal).max()).astype(np.float32)


def write_wav(path: str | Path, signal: np.ndarray, sample_rate: int) -> Path:
    """Writes [-1, 1] floats as a 16-bit PCM WAV."""
    from scipy.io import wavfile

    wavfile.write(str(path), sample_rate, (np.clip(signal, -1, 1) * 32767).astype(np.int16))
    return Path(path)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A WAV file as mono float32 divided by its peak (in [-1, 1]), and its sample rate."""
    if not os.path.isfile(path):
        raise MissingDataError(f"data.audio={str(path)!r}: no such WAV file")
    try:
        import soundfile

        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except ImportError:  # scipy reads PCM WAV too (the peak division below makes the dtype's scale moot)
        from scipy.io import wavfile

        rate, wave = wavfile.read(str(path))
        wave = wave.astype(np.float32).reshape(len(wave), -1)
    wave = wave.mean(axis=1)
    peak = float(np.abs(wave).max())
    if peak == 0:
        raise ValueError(f"{path}: the waveform is silent")
    return (wave / peak).astype(np.float32), int(rate)


# ----------------------------------------------------------------------------- entry
def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if cfg is not None else default
    return default if value is None else value


def _under_root(path: str, root: Optional[str]) -> str:
    """A relative `path` is looked up under ``data.root`` when that is set (``video/cat_video.mp4``)."""
    if root and not os.path.isabs(path) and not os.path.exists(path):
        return str(Path(root).expanduser() / path)
    return path


def build_datasets(cfg: Mapping[str, Any], work_dir: str | Path | None = None) -> Signal:
    """The Signal that ``cfg`` (the run's ``data:`` block) names; see the module docstring."""
    kind = str(_get(cfg, "kind", "image"))
    if kind == "image":
        name = str(_get(cfg, "image", "camera"))
        image = read_image(name, cfg.get("root"), int(_get(cfg, "index", 0)))
        image = _channels(square_resize(image, cfg.get("size")), cfg.get("grey"))
        return grid_signal("image", name, image, str(_get(cfg, "protocol", "full")))
    if kind == "video":
        path = _under_root(str(_get(cfg, "video", "skimage_gif")), cfg.get("root"))
        return grid_signal("video", path, read_video(path, cfg.get("max_frames")))
    if kind == "audio":
        path = _under_root(str(_get(cfg, "audio", "synthetic")), cfg.get("root"))
        if path == "synthetic":
            rate = int(_get(cfg, "sample_rate", 16000))
            folder = Path(work_dir) if work_dir is not None else Path.cwd()
            folder.mkdir(parents=True, exist_ok=True)
            path = str(write_wav(folder / "synthetic.wav",
                                 synthetic_audio(float(_get(cfg, "seconds", 3.0)), rate), rate))
        wave, rate = read_wav(path)
        return grid_signal("audio", path, wave[:, None], sample_rate=rate)
    raise ValueError(f"data.kind={kind!r}: use image, video or audio")


def input_scale(model_cfg: Mapping[str, Any], signal: Signal) -> float:
    """``model.input_scale``, scaled with the resolution when ``model.scale_resolution`` is set.

    Upstream's scales are for one grid (256 for the 512x512 camera): the frequencies a
    grid holds grow with its side, so the scale used is
    ``input_scale * signal.resolution / scale_resolution`` (128 for camera at 256x256).
    """
    scale = float(model_cfg.get("input_scale"))
    reference = model_cfg.get("scale_resolution")
    return scale * signal.resolution / float(reference) if reference else scale
