"""The real flow datasets under ``data.root``, read by torchvision's loaders, in two layouts.

torchvision's folder names (``torchvision.datasets.FlyingChairs / FlyingThings3D / Sintel /
KittiFlow / HD1K``) or the RAFT / DEQ-Flow ones (``datasets/`` of those repositories):

=============  ==================================================  ==================================================
dataset        torchvision                                         RAFT / DEQ-Flow
=============  ==================================================  ==================================================
chairs         FlyingChairs/data/*.ppm,*.flo                       FlyingChairs_release/data/*.ppm,*.flo
               FlyingChairs/FlyingChairs_train_val.txt             chairs_split.txt (root or FlyingChairs_release/)
things         FlyingThings3D/frames_{clean,final}pass/TRAIN/..,   the same
               FlyingThings3D/optical_flow/TRAIN/.. (.pfm)
sintel         Sintel/training/{clean,final,flow}/<scene>/         the same
kitti          KittiFlow/training/{image_2,flow_occ}/              KITTI/training/{image_2,flow_occ}/
hd1k           hd1k/hd1k_input/image_2, hd1k/hd1k_flow_gt/flow_occ  HD1k/...
=============  ==================================================  ==================================================

A RAFT layout is shown to torchvision through a folder of symbolic links (nothing is
copied). A missing dataset is a `MissingDataError` that lists the layouts looked for.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from zoo.common import MissingDataError
from zoo.deq_flow.augment import STAGE_SCALES, FlowAugmentor

__all__ = ["LAYOUTS", "resolve_root", "load_flow_dataset", "FlowPairs", "real_train_set", "real_eval_set"]

# dataset -> (torchvision layout: paths that must exist, RAFT layout: {torchvision name: RAFT path})
LAYOUTS: dict[str, tuple[list[str], dict[str, list[str]]]] = {
    "chairs": (["FlyingChairs/data", "FlyingChairs/FlyingChairs_train_val.txt"],
               {"FlyingChairs/data": ["FlyingChairs_release/data"],
                "FlyingChairs/FlyingChairs_train_val.txt": ["FlyingChairs_release/chairs_split.txt",
                                                            "chairs_split.txt"]}),
    "things": (["FlyingThings3D/optical_flow"], {}),
    "sintel": (["Sintel/training"], {}),
    "kitti": (["KittiFlow/training"], {"KittiFlow": ["KITTI"]}),
    "hd1k": (["hd1k/hd1k_flow_gt"], {"hd1k": ["HD1k"]}),
}

_LINK_DIRS: list[str] = []


def _cleanup() -> None:
    for d in _LINK_DIRS:
        shutil.rmtree(d, ignore_errors=True)  # removes the links, never their targets


atexit.register(_cleanup)


def resolve_root(root: Optional[str | Path], name: str) -> Path:
    """A directory torchvision's loader of `name` accepts: ``root`` itself, or a link view of it."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown flow dataset {name!r}: {', '.join(LAYOUTS)}")
    required, raft = LAYOUTS[name]
    looked = [" + ".join(required) + "  (torchvision)"]
    if raft:
        looked.append(" + ".join(" or ".join(v) for v in raft.values()) + "  (RAFT / DEQ-Flow)")
    hint = f"expected under data.root one of these layouts for {name}:\n    " + "\n    ".join(looked)
    if root in (None, "", "???"):
        raise MissingDataError(f"data.root is not set; {hint}\n(zoo/deq_flow/README.md; offline: "
                               "+experiment=synthetic)")
    root = Path(root).expanduser()
    if all((root / p).exists() for p in required):
        return root
    if raft:
        found = {}
        for target, candidates in raft.items():
            hit = next((root / c for c in candidates if (root / c).exists()), None)
            if hit is None:
                break
            found[target] = hit
        else:
            view = Path(tempfile.mkdtemp(prefix=f"deq_flow_{name}_"))
            _LINK_DIRS.append(str(view))
            for target, source in found.items():
                (view / target).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(source.absolute(), view / target)
            return view
    raise MissingDataError(f"data.root={str(root)!r}: no {name} dataset found; {hint}")


def load_flow_dataset(root: Optional[str | Path], name: str, split: str = "train", pass_name: str = "clean",
                      camera: str = "left"):
    """torchvision's dataset `name` (chairs, things, sintel, kitti, hd1k) from either layout."""
    import torchvision.datasets as tvd

    base = resolve_root(root, name)
    if name == "chairs":
        return tvd.FlyingChairs(base, split=split)
    if name == "things":
        return tvd.FlyingThings3D(base, split=split, pass_name=pass_name, camera=camera)
    if name == "sintel":
        return tvd.Sintel(base, split=split, pass_name=pass_name)
    if name == "kitti":
        return tvd.KittiFlow(base, split=split)
    return tvd.HD1K(base, split=split)


class FlowPairs(Dataset):
    """A torchvision flow dataset as ``(img1, img2, flow, valid)`` tensors, images in [-1, 1].

    ``valid``: the dataset's own mask (KITTI, HD1K) or |u|, |v| < 1000 (dense sets, as
    RAFT); ``augment`` (a `FlowAugmentor`) is applied on [0, 255] images before scaling.
    ``scenes`` (Sintel) names each pair's sequence, for the warm start along a scene.
    """

    def __init__(self, base, augment: Optional[FlowAugmentor] = None):
        self.base, self.augment = base, augment
        self.scenes = [Path(p[0]).parent.name for p in getattr(base, "_image_list", [])]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        item = self.base[index]
        img1, img2, flow = (torch.from_numpy(np.array(x, dtype=np.float32)) for x in item[:3])
        img1, img2 = img1.permute(2, 0, 1), img2.permute(2, 0, 1)
        if len(item) > 3 and item[3] is not None:
            valid = torch.from_numpy(np.asarray(item[3], dtype=np.float32))
        else:
            valid = ((flow[0].abs() < 1000) & (flow[1].abs() < 1000)).float()
        if self.augment is not None:
            img1, img2, flow, valid = self.augment(img1, img2, flow, valid)
        return img1 / 127.5 - 1, img2 / 127.5 - 1, flow.contiguous(), valid.contiguous()


def real_train_set(cfg: Any, name: str) -> Dataset:
    """The training stage `name` (chairs or things) with RAFT's dense augmentation."""
    low, high = cfg.get("scale_range") or STAGE_SCALES[name]
    aug = FlowAugmentor(tuple(cfg.image_size), float(low), float(high), bool(cfg.get("do_flip", True)))
    if name == "chairs":
        return FlowPairs(load_flow_dataset(cfg.root, "chairs", "train"), aug)
    passes = ["clean", "final"] if str(cfg.get("things_passes", "both")) == "both" else [str(cfg.things_passes)]
    return ConcatDataset([FlowPairs(load_flow_dataset(cfg.root, "things", "train", p), aug) for p in passes])


def real_eval_set(cfg: Any, name: str):
    """chairs (val), sintel_clean / sintel_final (training split, every pixel), kitti (training)."""
    from zoo.deq_flow.data import EvalSet

    if name == "chairs":
        return EvalSet("chairs", FlowPairs(load_flow_dataset(cfg.root, "chairs", "val")))
    if name in ("sintel_clean", "sintel_final"):
        ds = FlowPairs(load_flow_dataset(cfg.root, "sintel", "train", name.split("_")[1]))
        return EvalSet(name, ds, use_valid=False, scenes=ds.scenes)
    if name == "kitti":
        return EvalSet("kitti", FlowPairs(load_flow_dataset(cfg.root, "kitti", "train")), protocol="kitti",
                       pad_mode="kitti")
    raise ValueError(f"unknown real evaluation set {name!r}")
