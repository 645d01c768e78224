"""Fixed-point solvers: fixed-point iteration, Anderson acceleration, limited-memory Broyden.

Common signature: `solver(func, x0, max_iter=50, tol=1e-3, stop_mode='abs', indexing=None,
return_final=False, **solver_kwargs) -> (z, states_at_indexing, info)`; see
`fixed_point_iter` for the arguments and `core.solvers.stat` for `info` (every value a
tensor). On CPU, eager solves keep their scratch memory between calls: see
`core.solvers.workspace`. Under torch.compile / torch.export every solver takes its
traceable sync-free path by itself (`core.solvers.problem`); fixed-point iteration and
Anderson also solve complex states.
"""
from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point_iter, simple_fixed_point_iter
from .registry import get_solver, register_solver
from .stat import SolverStat, solver_stat_from_final_step

__all__ = [
    "get_solver", "register_solver", "fixed_point_iter", "simple_fixed_point_iter",
    "anderson", "broyden", "solver_stat_from_final_step", "SolverStat",
]
