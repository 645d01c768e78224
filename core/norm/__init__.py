"""DEQ weight normalisation: weight norm and spectral norm, computed once per DEQ forward.

`apply_norm(f, args=cfg)` once after building f, `reset_norm(f)` at the start of every
DEQ forward (`core.deq.reset_deq` does it), `remove_norm(f)` to bake the weights after
training. See `core/norm/base.py` for the shared formula.
"""
from core.norm.base import (DEQNorm, apply_norm, register_norm, register_norm_module, remove_norm,
                            reset_norm)
from core.norm.spectral_norm import SpectralNorm
from core.norm.weight_norm import WeightNorm

register_norm("weight_norm", WeightNorm)
register_norm("spectral_norm", SpectralNorm)

__all__ = ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module",
           "DEQNorm", "WeightNorm", "SpectralNorm"]
