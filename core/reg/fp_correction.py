"""Fixed-point correction (TorchDEQ paper eq. 19): a weighted loss over a DEQ's states.

`fp_correction(crit, (preds, target))` returns sum_i w(n, i) * crit(preds[i], target) over
the n states a DEQ returned (sampled along the solver path), so the intermediate states are
supervised too, with the last (closest to the fixed point) weighted most. Every element of
`args` is a sequence of per-state values or a single value used for every state.

Weight functions w(n, k), k = 0 .. n-1: `exp` gamma^(n-1-k) (gamma 0.8), `linear`
1 - (n-1-k)/n * gamma + bias (gamma 0.9, bias 0), `const` c (1.0). Unlike TorchDEQ's,
`const` is a number (TorchDEQ's is a `.cuda()` tensor, which fails on CPU) and nothing here
moves data between devices or syncs the host, except `return_loss_values` (floats).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import torch

__all__ = ["fp_correction", "register_weight_func"]


def _exp(n: int, k: int, gamma: float = 0.8) -> float:
    return gamma ** (n - k - 1)


def _linear(n: int, k: int, gamma: float = 0.9, bias: float = 0.0) -> float:
    return 1 - (n - k - 1) / n * gamma + bias


def _const(n: int, k: int, c: float = 1.0) -> float:
    return c


_weight_funcs: Dict[str, Callable[..., float]] = {"exp": _exp, "linear": _linear, "const": _const}


def register_weight_func(name: str, func: Callable[..., float]) -> None:
    """Register `func(n, k, **kw) -> weight of state k of n` under `name`."""
    if not callable(func):
        raise TypeError(f"register_weight_func: {func!r} is not callable")
    _weight_funcs[name] = func


def fp_correction(crit: Callable[..., torch.Tensor], args: Sequence[Any], weight_func: str = "exp",
                  return_loss_values: bool = False,
                  **kwargs: Any) -> Union[torch.Tensor, Tuple[torch.Tensor, List[float]]]:
    """Weighted sum of `crit` over aligned sequences (e.g. predictions per DEQ state).

    Args:
        crit: the loss, called as crit(*[a[i] for a in args]).
        args: a tuple whose elements are sequences (one item per state) or single values
            (used for every state); n is the longest length, shorter ones cycle.
        weight_func: 'exp', 'linear', 'const' or a registered name.
        return_loss_values: also return each state's unweighted loss as a float.
        **kwargs: passed to the weight function (e.g. gamma=0.8).
    """
    if weight_func not in _weight_funcs:
        raise ValueError(f"fp_correction: weight_func={weight_func!r} is not registered; choose one of "
                         f"{', '.join(_weight_funcs)}")
    weight_of = _weight_funcs[weight_func]
    columns = [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]
    if not columns or not all(columns):
        raise ValueError("fp_correction: args must hold at least one non-empty sequence or value")
    n = max(len(c) for c in columns)
    loss = 0.0
    values = []
    for k in range(n):
        state_loss = crit(*[c[k % len(c)] for c in columns])
        loss = loss + weight_of(n, k, **kwargs) * state_loss
        if return_loss_values:
            values.append(float(state_loss.detach()))
    return (loss, values) if return_loss_values else loss
