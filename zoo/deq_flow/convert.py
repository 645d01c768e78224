"""Load published DEQ-Flow checkpoints (TorchDEQ zoo, DEQ-Flow v1.0 / v2.0) into `DEQFlow`.

Every upstream version saves ``nn.DataParallel(DEQFlow).state_dict()``: a bare state dict
whose keys start with ``module.``. Our module names are upstream's (``fnet``, ``cnet``,
``update_block.{encoder,gru,flow_head}``, ``mask``), so the conversion is small:

- drop the ``module.`` prefixes, and the encoders' ``layerK.0.norm3.*`` (RAFT registers the
  shortcut's norm twice, as ``norm3`` and ``downsample.1``: the same tensors);
- v1.0 keeps the upsampling mask inside the update block: ``update_block.mask.{0,2}`` ->
  ``mask.{0,2}``;
- weight norm: upstream stores ``weight_g`` / ``weight_v`` on the update block (as ours);
  for a model built with ``deq.norm_type=none`` they are folded into ``weight = g v / |v|``,
  and a plain ``weight`` is split into ``v = weight, g = |weight|`` for a weight-normed model;
- GMA checkpoints (``attn.*``, ``update_block.gma.*``) and spectral-norm ones
  (``*_orig``) have no counterpart here: an error says so.

The load is strict: a wrong ``model.size`` lists the missing, unexpected and mis-shaped keys
(B: hdim 128, H: hdim 256; v1.0's H has a 256-wide flow head: ``model.size=H
model.head_dim=256``).

Usage::

    python -m zoo.deq_flow.evaluate +experiment=sintel_eval ckpt=deq-flow-B-things-2.pth ckpt_format=torchdeq \\
        data.root=/data
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from zoo.common.convert import checkpoint_weights, load_strictly, strip_module_prefix
from zoo.common.convert import match_weight_norm as match_common_weight_norm

__all__ = ["upstream_to_ours", "match_weight_norm", "load_torchdeq_checkpoint"]

KEY_RULES: tuple[tuple[str, str], ...] = ((r"^update_block\.mask\.", "mask."),)
DUPLICATES = re.compile(r"^[fc]net\.layer\d\.0\.norm3\.")
UNSUPPORTED = (re.compile(r"^(attn\.|update_block\.gma\.)"), re.compile(r"_orig$"))


def upstream_to_ours(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The tensors under our names; ValueError for GMA / spectral-norm checkpoints."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        key = strip_module_prefix(key)
        if DUPLICATES.match(key):
            continue
        for rule in UNSUPPORTED:
            if rule.search(key):
                raise ValueError(f"checkpoint key {key!r}: GMA and spectral-norm DEQ-Flow checkpoints are "
                                 "not supported (weight norm or none, no --gma)")
        for pattern, repl in KEY_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def match_weight_norm(state: Mapping[str, torch.Tensor],
                      target: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """`zoo.common.convert.match_weight_norm`, plus BatchNorm's counter that old checkpoints lack."""
    out = match_common_weight_norm(state, target)
    for key, value in target.items():
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = value.clone()
    return out


def load_torchdeq_checkpoint(model: nn.Module, source: Any) -> nn.Module:
    """Loads an upstream DEQ-Flow checkpoint (a path or the loaded object) into `model`, strictly."""
    if not isinstance(source, Mapping):
        source = torch.load(source, map_location="cpu", weights_only=True)
    state = match_weight_norm(upstream_to_ours(checkpoint_weights(source, "DEQ-Flow checkpoint")),
                              model.state_dict())
    load_strictly(model, state, "the checkpoint does not fit this DEQFlow (is model.size right? B or H)")
    return model
