"""Load checkpoints of the TorchDEQ zoo's IGNN (``ignn-ppi-{1,2,3}.pth``) into `zoo.ignn.model.IGNN`.

The TorchDEQ zoo (deq-zoo/ignn/nodeclassification, models_PPI.py) saves a plain
``model.state_dict()``: ``ignn.{0..4}.*`` (the implicit layers) and ``proj.{0..4}.{weight,
bias}`` (the linear skips). Its recipe registers spectral norm on W, Omega_1 and Omega_2,
so each layer holds ``W_orig`` (m, m), ``W_g`` (m, 1), ``W_u`` (m,), ``W_v`` (m,) and the
same four for ``Omega_1`` / ``Omega_2`` ((m, p), (m, 1), (m,), (p,)), plus a ``bias``
(m, 1) its forward never uses. Our module names are the same (``ignn``, ``proj``), so
`torchdeq_to_ours` only strips DataParallel's ``module.`` prefix and drops the dead bias.
`load_torchdeq_checkpoint(model, path)` also folds the spectral norm into plain weights
when the model was built with ``deq.norm_type=none`` (W = W_orig * min(clip, g / sigma),
sigma = u^T W_orig v from the saved power-iteration vectors, clip the recipe's 1.0), and
loads strictly: a wrong
size is an error that lists the missing, unexpected and mis-shaped tensors.

Usage::

    python -m zoo.ignn.evaluate +experiment=ppi data.root=/data/PPI ckpt=ignn-ppi-1.pth ckpt_format=torchdeq
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from zoo.common.convert import checkpoint_weights, load_strictly, strip_module_prefix

DEAD = re.compile(r"^ignn\.\d+\.bias$")  # the reference layer's unused bias
NORMED = ("W", "Omega_1", "Omega_2")


# candidate for zoo/common: the same as zoo/mdeq/convert.py's
def torchdeq_to_ours(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The same tensors under our names: ``module.`` prefixes removed, ``ignn.i.bias`` dropped."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        key = strip_module_prefix(key)
        if not DEAD.match(key):
            out[key] = value
    return out


def fold_spectral_norm(state: Mapping[str, torch.Tensor], clip: float | None
                       ) -> "OrderedDict[str, torch.Tensor]":
    """``X_orig, X_g, X_u, X_v`` -> the effective ``X = X_orig * min(clip, g / sigma)``."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        base = next((n for n in NORMED if name in (f"{n}_orig", f"{n}_g", f"{n}_u", f"{n}_v")), None)
        if base is None:
            out[key] = value
        elif name == f"{base}_orig":
            p = f"{prefix}.{base}"
            sigma = torch.dot(state[f"{p}_u"], state[f"{p}_orig"] @ state[f"{p}_v"])
            factor = state[f"{p}_g"] / sigma
            out[p] = value * (factor.clamp(max=clip) if clip is not None else factor)
    return out


def load_torchdeq_checkpoint(model: nn.Module, path_or_state: Any, clip: float | None = 1.0) -> None:
    """Loads a TorchDEQ zoo IGNN checkpoint (path or object) into `model`, strictly.

    `clip` is the norm_clip_value the checkpoint was trained with (None: no clipping), used
    only to fold its spectral norm into plain weights: the recipe's ``--norm_clip`` is 1.0.
    """
    obj = path_or_state
    if not isinstance(obj, Mapping):
        obj = torch.load(str(obj), map_location="cpu", weights_only=True)
    state = torchdeq_to_ours(checkpoint_weights(obj, "TorchDEQ IGNN checkpoint"))
    target = model.state_dict()
    if any(k.endswith(".W_orig") for k in state) and not any(k.endswith(".W_orig") for k in target):
        state = fold_spectral_norm(state, clip)
    load_strictly(model, state, "the checkpoint does not fit this IGNN (check model.size / model.widths and "
                  "deq.norm_type)")
