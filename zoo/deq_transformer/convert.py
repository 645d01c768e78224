"""TorchDEQ zoo DEQ-Transformer state dicts (deq-lm, deq-seq) -> our `DEQTransformerLM`.

Both upstream trainers save a plain state dict (``model.pth``, ``best_model.pth``,
``final.pth``; a ``module.`` prefix when saved from a DDP/DataParallel wrapper). Our module
names follow deq-lm's, so most keys load as they are:

* ``word_emb.emb_layers.i.weight``, ``word_emb.emb_projs.i.weight``, ``injection.{weight,bias}``
  (deq-seq: ``inject_conv``), ``pos_emb.inv_freq``;
* ``func.dec_attn.i.{qkv_net,r_net,o_net}.weight_{g,v}`` (+ ``o_net.bias``),
  ``r_w_bias``, ``r_r_bias``, ``ln1``, ``ln2``; ``func.pos_ff.i.{ff1_net,ff2_net}`` and ``ln``.
  deq-seq has one block without a ModuleList (``func.dec_attn.qkv_net``), mapped to block 0;
* ``crit.cluster_weight``, ``crit.cluster_bias``, ``crit.out_layers.i.{weight,bias}``,
  ``crit.out_projs.i.weight``. The output embeddings are ours tied to the input ones and so
  are the tail projections (i >= 1); upstream saves both copies (equal, shared storage),
  and a copy that differs from the embedding is an error rather than silently dropped.

A weight saved without weight norm (``<layer>.weight`` where we hold ``weight_v``/``weight_g``)
is loaded as ``weight_v`` with ``weight_g`` its row norms, which gives the same W_eff.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping

import torch

from zoo.common.convert import check_fits, strip_module_prefix

_SINGLE_BLOCK = re.compile(r"^func\.(dec_attn|pos_ff)\.(?!\d+\.)")


def convert_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Upstream keys -> the keys of `model.state_dict()`; missing, unexpected and mis-shaped keys are
    a ValueError (`zoo.common.convert.check_fits`)."""
    ours = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = strip_module_prefix(key)
        key = _SINGLE_BLOCK.sub(lambda m: f"func.{m.group(1)}.0.", key)
        if key not in ours and key.endswith(".weight") and key[:-len("weight")] + "weight_v" in ours:
            stem = key[:-len("weight")]
            g_shape = ours[stem + "weight_g"].shape
            dims = [d for d in range(value.dim()) if d != 0]
            out[stem + "weight_v"] = value
            out[stem + "weight_g"] = torch.linalg.vector_norm(value, dim=dims, keepdim=True).reshape(g_shape)
            continue
        out[key] = value
    check_fits(out, ours, "TorchDEQ checkpoint does not match the model (is the size / vocabulary / cutoffs right?)")
    for i in range(len(model.crit.out_layers)):
        pairs = [(f"crit.out_layers.{i}.weight", f"word_emb.emb_layers.{i}.weight")]
        if i > 0:
            pairs.append((f"crit.out_projs.{i}.weight", f"word_emb.emb_projs.{i}.weight"))
        for tied, source in pairs:
            if not torch.equal(out[tied], out[source]):
                raise ValueError(f"{tied} differs from {source}, which the model ties to it")
    return out


def load_torchdeq_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Loads a TorchDEQ zoo DEQ-Transformer state dict file into `model`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    model = getattr(model, "module", model)
    model.load_state_dict(convert_state_dict(state, model))
