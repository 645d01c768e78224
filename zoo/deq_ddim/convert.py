"""Load published DDPM checkpoints into `zoo.deq_ddim.model.DiffusionUNet` (no download).

Formats read (the files come from a path the user gives, ``ckpt=...``):

- pesser/pytorch_diffusion's converted DDPM models (e.g. ``ema_diffusion_cifar10_model/
  model-790000.ckpt``): a plain state dict, no prefix;
- ermongroup/ddim checkpoints (``ckpt.pth``): a list whose [0] is the DataParallel
  (``module.``) state dict and whose [-1] is the EMA helper's shadow parameters
  (``ema=true`` takes those, over the buffers of [0]);
- ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers.

The names inside are the DDPM UNet's (temb.dense.*, conv_in, down.<l>.block.<i>.*,
down.<l>.attn.<i>.{norm,q,k,v,proj_out}, down.<l>.downsample.conv, mid.{block_1,attn_1,
block_2}, up.<l>.block.<i>.*, up.<l>.upsample.conv, norm_out, conv_out), which our
module keeps, so `ddpm_to_ours` only removes the wrappers and prefixes. Loading is strict:
a wrong size is an error listing the missing, unexpected and mis-shaped tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from zoo.common.convert import load_strictly

PREFIXES = ("module.", "model.", "_orig_mod.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def unwrap_checkpoint(obj: Any, ema: bool = False) -> Mapping[str, torch.Tensor]:
    """The state dict inside one of the published checkpoint containers (see the module doc)."""
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise ValueError("empty checkpoint list")
        state = dict(unwrap_checkpoint(obj[0]))
        if ema:
            shadow = obj[-1]
            if not isinstance(shadow, Mapping) or len(obj) < 2:
                raise ValueError("ema=true: the checkpoint list has no EMA helper state at [-1]")
            state.update(shadow)
        return state
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        return obj
    raise ValueError(f"unrecognised checkpoint container {type(obj).__name__}")


def ddpm_to_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDPM UNet key names (with DataParallel / wrapper prefixes) -> ours."""
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        new = _strip(key)
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


def load_ddpm_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strictly loads a converted state dict; the error lists what does not fit."""
    load_strictly(model, ddpm_to_ours(state), "the DDPM checkpoint does not fit this model (is model.size right?)")


def load_ddpm_checkpoint(model: torch.nn.Module, path: str | Path, ema: bool = False) -> None:
    """Reads `path` (any format above) on the CPU and loads it into `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(path)!r}: no such file (a DDPM state dict, e.g. pesser/pytorch_diffusion's "
                                "ema_diffusion_cifar10_model/model-790000.ckpt)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    load_ddpm_state(model, unwrap_checkpoint(obj, ema=ema))
