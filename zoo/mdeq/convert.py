"""Load checkpoints trained with the TorchDEQ zoo's MDEQ into `zoo.mdeq.model.MDEQ`.

The TorchDEQ zoo (deq-zoo/mdeq_cifar, mdeq_imagenet) names its modules after the
original MDEQ: ``downsample`` (stem), ``stage0`` (injection conv), ``fullstage``
(f_theta: ``branches.i.blocks.k``, ``fuse_layers.i.j.net[.k].{conv,gnorm}``,
``post_fuse_layers.i.{conv,gnorm}``), ``incre_modules.i.0`` (head Bottlenecks, shortcut
``downsample``), ``downsamp_modules``, ``final_layer`` and ``classifier``. Its weight norm
stores ``weight_g`` / ``weight_v``; DataParallel/DDP checkpoints prefix every key with
``module.``; training checkpoints wrap the weights in ``{"state_dict": ...}``.

`torchdeq_to_ours(state_dict)` renames the keys; `load_torchdeq_checkpoint(model, path)`
also reconciles weight norm (folds g and v into a plain weight, or splits one into g and
v, whichever the target model has) and loads strictly, so a wrong size or a key that has
no counterpart is an error that lists them.

Usage::

    python -m zoo.mdeq.evaluate +experiment=cifar_tiny ckpt=/path/final_state.pth ckpt_format=torchdeq
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn

from zoo.common.convert import checkpoint_weights, load_strictly, match_weight_norm, strip_module_prefix

# (pattern, replacement) applied in order to each key (after the `module.` prefix is gone).
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"^downsample\.", "stem."),
    (r"^stage0\.", "injection."),
    (r"^fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.", r"f.fuse.\1.\2."),
    (r"^fullstage\.post_fuse_layers\.", "f.post_fuse."),
    (r"^fullstage\.", "f."),
    (r"^incre_modules\.(\d+)\.0\.downsample\.", r"head.incre.\1.shortcut."),
    (r"^incre_modules\.(\d+)\.0\.", r"head.incre.\1."),
    (r"^downsamp_modules\.", "head.down."),
    (r"^final_layer\.", "head.final."),
    (r"^classifier\.", "head.classifier."),
    (r"\.gnorm\.", ".gn."),
)
# Keys with no counterpart in our model: the original MDEQ's copy of f_theta (used by
# its hand-written IFT backward) carries no information of its own.
IGNORED = re.compile(r"^fullstage_copy\.")


def torchdeq_to_ours(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The same tensors under our key names (`module.` prefixes removed)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        key = strip_module_prefix(key)
        if IGNORED.match(key):
            continue
        for pattern, repl in KEY_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def load_torchdeq_checkpoint(model: nn.Module, source: Any) -> nn.Module:
    """Loads a TorchDEQ-zoo MDEQ checkpoint (a path, or the loaded object) into `model`."""
    if not isinstance(source, Mapping):
        source = torch.load(source, map_location="cpu", weights_only=False)
    state = match_weight_norm(torchdeq_to_ours(checkpoint_weights(source, "TorchDEQ MDEQ checkpoint")),
                              model.state_dict())
    load_strictly(model, state, "TorchDEQ checkpoint does not fit this MDEQ (is model.size right?)")
    return model
