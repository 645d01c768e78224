"""The solver registry: names -> solver functions, and the option names each accepts.

One config can switch solvers (`f_solver=anderson` with `f_solver_kwargs={'m': 5}` and
then `f_solver=fixed_point_iter`), so a solver ignores an option that another registered
solver accepts. An option that no registered solver accepts is a mistake (TorchDEQ
silently drops a misplaced `stop_mode`): it raises TypeError naming the closest known name.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Iterable

__all__ = ["get_solver", "register_solver", "solver_options", "check_options"]

# Arguments of the common signature and our extra flags; every solver accepts these.
COMMON_OPTIONS = frozenset({
    "max_iter", "tol", "stop_mode", "indexing", "return_final",
    "sync_free", "batch_independent", "whole_state", "check_every",
})

_SOLVERS: dict[str, Callable] = {}
_OPTIONS: dict[str, frozenset[str]] = {}


def register_solver(name: str, solver: Callable, options: Iterable[str] | None = None) -> Callable:
    """Register `solver` under `name` (replacing any earlier one); returns `solver`.

    `options` are the solver-specific keyword names it accepts (e.g. `('m', 'lam', 'tau')`);
    by default they are read from its signature (keyword parameters after `func, x0`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"solver name must be a non-empty string, got {name!r}")
    if not callable(solver):
        raise ValueError(f"solver {name!r} must be callable, got {type(solver).__name__}")
    if options is None:
        params = list(inspect.signature(solver).parameters.values())[2:]
        options = [p.name for p in params
                   if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    _SOLVERS[name] = solver
    _OPTIONS[name] = frozenset(options) | COMMON_OPTIONS
    return solver


def get_solver(name: str) -> Callable:
    """The solver registered as `name`; ValueError listing the known names otherwise."""
    if callable(name):
        return name
    try:
        return _SOLVERS[name]
    except (KeyError, TypeError):
        known = sorted(_SOLVERS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown solver {name!r}{hint}; registered solvers: {known}") from None


def solver_options(name: str) -> frozenset[str]:
    """The option names the solver `name` accepts (common ones included)."""
    return _OPTIONS[name]


def check_options(name: str, extra: dict) -> None:
    """Reject keyword arguments that no registered solver accepts.

    `extra` holds the keywords `name`'s solver did not consume itself. Those accepted by
    another registered solver are ignored; any other raises TypeError naming it and the
    closest known option.
    """
    if not extra:
        return
    known = set().union(*_OPTIONS.values())
    for key in extra:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(
            f"{name}() got an unknown keyword argument {key!r}{hint} "
            f"({name} accepts {sorted(_OPTIONS[name])})")
