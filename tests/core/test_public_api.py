"""`import core` offers every public name of TorchDEQ 0.1 (specs/torchdeq-api.md)."""
import core

TORCHDEQ_NAMES = [
    "add_deq_args", "get_deq", "register_deq", "reset_deq", "get_solver", "register_solver",
    "solver_stat_from_final_step", "apply_norm", "reset_norm", "remove_norm", "register_norm",
    "register_norm_module", "VariationalDropout", "VariationalDropout1d", "VariationalDropout2d",
    "VariationalDropout3d", "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d",
    "reset_dropout", "fp_correction", "register_weight_func", "jac_reg", "power_method", "mixed_init",
    "mem_gc",
]


def test_every_torchdeq_name_is_public():
    missing = [name for name in TORCHDEQ_NAMES if not hasattr(core, name)]
    assert not missing, missing


def test_registered_solvers_match_torchdeq():
    for name in ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"):
        assert callable(core.get_solver(name))
