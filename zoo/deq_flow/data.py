"""Datasets for DEQ-Flow: the real benchmarks under ``data.root``, and the offline pairs.

``build_datasets(cfg.data, eval.sets)`` returns a `FlowData`: the training set of
``data.name`` (items ``(img1, img2, flow, valid)``, images (3, H, W) in [-1, 1]) and the
evaluation sets of ``eval.sets``, each with its metric protocol and padding mode.

- ``data.name=synthetic`` (offline): `zoo.deq_flow.synthetic.SyntheticFlow` pairs, plus
  3-frame sequences for the warm-start check; ``chairs`` / ``things``: the training
  stages (RAFT's augmentation, zoo.deq_flow.augment); ``none``: evaluation only.
- ``eval.sets``: ``val`` (the fixed synthetic validation set, seed ``data.val_seed``),
  ``motorcycle`` (the Middlebury pair from scikit-image), ``chairs`` (val split),
  ``sintel_clean`` / ``sintel_final`` (training split), ``kitti`` (2015 training split).

The real sets are read by torchvision's loaders (``.flo``, ``.pfm``, KITTI 16-bit PNG) in
their folder layouts; zoo.deq_flow.layouts also accepts the RAFT / DEQ-Flow names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from zoo.deq_flow.synthetic import SyntheticFlow, motorcycle_pair

__all__ = ["EvalSet", "FlowData", "build_datasets", "eval_sets", "collate_pairs", "TensorPairs"]


@dataclass
class EvalSet:
    """An evaluation set: items ``(img1, img2, flow, valid)``; valid None: every pixel counts."""

    name: str
    dataset: Dataset
    protocol: str = "pixels"   # pixels (Sintel / Chairs) | kitti (per-image AEPE, F1-all)
    pad_mode: str = "sintel"   # InputPadder mode
    use_valid: bool = True     # Sintel's protocol averages over every pixel
    scenes: Optional[list] = None  # sequence name of each pair (Sintel): eval.warm_start


@dataclass
class FlowData:
    train: Optional[Dataset]
    evals: list = field(default_factory=list)
    sequences: Optional[Dataset] = None   # (frames, flows, valids) items for the warm-start check


class TensorPairs(Dataset):
    """A fixed list of ``(img1, img2, flow, valid)`` tensors (the motorcycle pair)."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


SYNTHETIC_SETS = ("val", "motorcycle")
REAL_SETS = ("chairs", "sintel_clean", "sintel_final", "kitti")
TRAIN_SETS = ("synthetic", "chairs", "things", "none")


def _synthetic_options(cfg: Any) -> dict:
    return dict(size=tuple(cfg.image_size), max_shift=float(cfg.max_shift), deform=float(cfg.deform))


def eval_sets(cfg: Any, names) -> list:
    """The evaluation sets `names` (``eval.sets``): val, motorcycle, chairs, sintel_clean, sintel_final, kitti."""
    out = []
    for name in names:
        if name == "val":
            out.append(EvalSet("val", SyntheticFlow(int(cfg.val_size), seed=int(cfg.val_seed),
                                                    **_synthetic_options(cfg))))
        elif name == "motorcycle":
            out.append(EvalSet("motorcycle", TensorPairs([motorcycle_pair(int(cfg.motorcycle_downscale))])))
        elif name in REAL_SETS:
            from zoo.deq_flow.layouts import real_eval_set

            out.append(real_eval_set(cfg, name))
        else:
            raise ValueError(f"eval.sets: unknown set {name!r}; choose from {SYNTHETIC_SETS + REAL_SETS}")
    return out


def build_datasets(cfg: Any, sets=()) -> FlowData:
    """Training set of ``cfg.name`` (the ``data:`` node) and the evaluation `sets`.

    A missing dataset raises MissingDataError naming the layouts looked for, before any work.
    """
    name = str(cfg.name)
    if name not in TRAIN_SETS:
        raise ValueError(f"data.name={name!r}: choose one of {TRAIN_SETS}")
    train, sequences = None, None
    if name == "synthetic":
        train = SyntheticFlow(int(cfg.train_size), seed=int(cfg.seed), **_synthetic_options(cfg))
        sequences = SyntheticFlow(int(cfg.seq_size), seed=int(cfg.val_seed) + 1, frames=3,
                                  **_synthetic_options(cfg))
    elif name in ("chairs", "things"):
        from zoo.deq_flow.layouts import real_train_set

        train = real_train_set(cfg, name)
    return FlowData(train=train, evals=eval_sets(cfg, sets), sequences=sequences)


def collate_pairs(batch):
    """Stacks ``(img1, img2, flow, valid)`` items; a None valid stays None."""
    cols = list(zip(*batch))
    out = [torch.stack(c) for c in cols[:3]]
    out.append(None if cols[3][0] is None else torch.stack(cols[3]))
    return out
