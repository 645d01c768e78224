"""What every converter of published checkpoints needs: the weights inside a checkpoint
file, and weight-norm keys made to agree with the model that loads them.

A TorchDEQ-zoo or upstream checkpoint is a bare state dict or a training checkpoint that
holds one under ``state_dict`` (or ``model``); `checkpoint_weights` finds it. Weight norm
is stored either as ``weight_g`` / ``weight_v`` or folded into ``weight``;
`match_weight_norm` converts one into the other as the target state dict has it.
A converted state dict loads strictly (`load_strictly`): what does not fit is an error
that lists the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch


def checkpoint_weights(obj: Any, what: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """The state dict in `obj` (bare, or under ``state_dict`` / ``model``); ValueError otherwise,
    naming `what` was expected (e.g. "TorchDEQ MDEQ checkpoint")."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"not a {what}: expected a state dict or a dict with 'state_dict' holding one")


def strip_module_prefix(key: str) -> str:
    """``module.module.x`` -> ``x`` (DataParallel / DDP wrappers)."""
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))


def match_weight_norm(state: Mapping[str, torch.Tensor],
                      target: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Weight-norm keys as `target` has them: ``w = g * v / |v|`` when the target has a plain
    ``weight``; ``v = w, g = |w|`` when it has ``weight_g`` / ``weight_v``; ``g`` reshaped
    between (C, 1, 1, 1) and (C,)."""
    out = OrderedDict(state)
    for key in list(out):
        if key.endswith(".weight_v") and key not in target and key[:-2] in target:
            v, g = out.pop(key), out.pop(key[:-2] + "_g")
            out[key[:-2]] = g.reshape(-1, *([1] * (v.dim() - 1))) * v / _row_norm(v)
        elif key.endswith(".weight") and key not in target and key + "_v" in target:
            w = out.pop(key)
            out[key + "_v"], out[key + "_g"] = w, _row_norm(w)
    for key in out:
        if key.endswith("_g") and key in target and out[key].numel() == target[key].numel():
            out[key] = out[key].reshape(target[key].shape)
    return out


def check_fits(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str) -> None:
    """ValueError unless `state` has exactly the keys of `target`, each with its shape. The
    message starts with `what` (e.g. "the checkpoint does not fit this IGNN (is model.size
    right?)") and lists the missing, unexpected and mis-shaped keys, eight of each at most."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
                 for k in sorted(set(state) & set(target)) if state[k].shape != target[k].shape]
    if missing or unexpected or misshaped:
        def listed(label: str, items: list[str]) -> str:
            more = f" ... ({len(items)} in all)" if len(items) > 8 else ""
            return f"\n  {label}: {', '.join(items[:8])}{more}" if items else ""

        raise ValueError(what + ":" + listed("missing", missing) + listed("unexpected", unexpected)
                         + listed("mis-shaped", misshaped))


def load_strictly(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """`model.load_state_dict(state, strict=True)` after `check_fits` (which names `what`)."""
    check_fits(state, model.state_dict(), what)
    model.load_state_dict(state, strict=True)
