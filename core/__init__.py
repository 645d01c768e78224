"""core: the DEQ engine.

Every public name of TorchDEQ 0.1 with the same meaning (port a model by changing the import),
plus `DEQConfig`. Submodules: `solvers`, `deq`, `grad`, `norm`, `reg`, `utils`, `config`.
"""
from core.config import DEQConfig, add_deq_args
from core.deq import DEQBase, DEQIndexing, DEQSliced, get_deq, register_deq, reset_deq
from core.norm import apply_norm, register_norm, register_norm_module, remove_norm, reset_norm
from core.reg import fp_correction, jac_reg, power_method, register_weight_func
from core.solvers import get_solver, register_solver, solver_stat_from_final_step
from core.utils import (VariationalDropout, VariationalDropout1d, VariationalDropout2d,
                        VariationalDropout3d, VariationalDropToken1d, VariationalDropToken2d,
                        VariationalDropToken3d, mem_gc, mixed_init, reset_dropout)

__all__ = [
    "DEQConfig", "add_deq_args", "get_deq", "register_deq", "reset_deq", "DEQBase", "DEQSliced",
    "DEQIndexing", "get_solver", "register_solver", "solver_stat_from_final_step", "apply_norm",
    "reset_norm", "remove_norm", "register_norm", "register_norm_module", "fp_correction",
    "register_weight_func", "jac_reg", "power_method", "mixed_init", "mem_gc", "reset_dropout",
    "VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
    "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d",
]
