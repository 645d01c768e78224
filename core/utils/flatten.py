"""Multi-tensor states as one (B, D) matrix, and back.

The solvers work on a single matrix whose rows are samples. A DEQ state may be one tensor
or a tuple/list of tensors of different shapes (MDEQ's resolutions, DEQ-Flow's (h, flow));
`StateLayout` remembers the structure so that the solver can pack the state into rows,
hand `func` the original structure, and check that `func` returned the same structure.

Rows are samples (dim 0 of every tensor) unless `whole_state=True`, which makes the whole
state one row: coupled systems (one graph, a diffusion chain) where samples are not
independent. A tensor with fewer than 2 dims follows TorchDEQ: each element is a sample
(a 0-dim tensor is one sample).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["StateLayout", "pack", "unpack"]


@dataclass(frozen=True)
class StateLayout:
    """How a state (tensor, tuple or list of tensors) maps onto a (rows, D) matrix."""

    container: type | None  # None for a single tensor, else tuple or list
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]  # per-row width of each tensor
    dtype: torch.dtype
    device: torch.device
    whole_state: bool
    # A single (B, D) tensor: its own packed matrix (no reshape either way). Derived.
    _is_matrix: bool = field(init=False, repr=False, compare=False)

    # The shape of a single tensor's full batch (None for tuples/lists). Derived.
    _full_shape: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        single = self.container is None
        object.__setattr__(self, "_is_matrix", single and len(self.shapes[0]) == 2
                           and not self.whole_state)
        # ints, not a torch.Size: `view(*ints)` costs 3 us, `view(size)` 8 us
        object.__setattr__(self, "_full_shape", tuple(self._shape_with_rows(self.shapes[0], self.rows))
                           if single else None)

    @classmethod
    def of(cls, state, whole_state: bool = False) -> "StateLayout":
        """Describe `state`; raise ValueError for an empty tuple or mixed dtypes/devices/batches."""
        tensors, container = _as_tensors(state, "x0")
        if not tensors:
            raise ValueError("x0 is an empty tuple/list: pass at least one tensor")
        first = tensors[0]
        for i, t in enumerate(tensors):
            if t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"x0[{i}] has dtype {t.dtype} on {t.device} but x0[0] has {first.dtype} on "
                    f"{first.device}: give every state tensor the same dtype and device")
        if not whole_state:
            batch = _rows(first)
            for i, t in enumerate(tensors):
                if _rows(t) != batch:
                    raise ValueError(
                        f"x0[{i}] has batch size {_rows(t)} but x0[0] has {batch}: every state tensor "
                        "needs the batch in dim 0 (or pass whole_state=True for a coupled state)")
        if whole_state:
            sizes = tuple(t.numel() for t in tensors)
        else:
            sizes = tuple(t.numel() // max(_rows(t), 1) for t in tensors)
        return cls(container, tuple(t.shape for t in tensors), sizes, first.dtype, first.device,
                   whole_state)

    @property
    def rows(self) -> int:
        """Number of rows (samples) of the packed matrix."""
        return 1 if self.whole_state else _rows_of_shape(self.shapes[0])

    def flatten(self, state, rows: int | None = None, what: str = "func") -> torch.Tensor:
        """Pack `state` into a (rows, D) matrix, checking it has this layout's structure.

        `rows` is the expected number of rows (defaults to all samples); `what` names the
        producer of `state` in error messages.
        """
        rows = self.rows if rows is None else rows
        if (self.container is None and torch.is_tensor(state) and state.dtype == self.dtype
                and state.shape == (self._full_shape if rows == self.rows
                                    else self._shape_with_rows(self.shapes[0], rows))):
            # The common case, checked without building lists; a (rows, D) state as is.
            return state if self._is_matrix else state.reshape(rows, -1)
        tensors, container = _as_tensors(state, what)
        if (container is None) != (self.container is None) or len(tensors) != len(self.shapes):
            raise ValueError(
                f"{what} returned {_describe(state)} but the state is {self._describe()}: "
                "func must return the same structure it is given")
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            expected = self._shape_with_rows(shape, rows)
            if t.shape != expected or t.dtype != self.dtype:
                where = "" if self.container is None else f"[{i}]"
                raise ValueError(
                    f"{what}{where} returned shape {tuple(t.shape)} and dtype {t.dtype}, expected "
                    f"{tuple(expected)} and {self.dtype}: func must map a state to a state of the "
                    "same shape and dtype")
        if len(tensors) == 1:
            return tensors[0].reshape(rows, -1)
        return torch.cat([t.reshape(rows, -1) for t in tensors], dim=1)

    def unflatten(self, matrix: torch.Tensor):
        """Unpack a (rows, D) matrix (any number of rows) into this layout's structure."""
        if self._is_matrix:
            return matrix
        rows = matrix.shape[0]
        if self._full_shape and rows == self.rows:  # (not for a 0-dim state: view() needs a size)
            return matrix.view(*self._full_shape)
        if len(self.shapes) == 1:
            out = [matrix.reshape(self._shape_with_rows(self.shapes[0], rows))]
        else:
            parts = torch.split(matrix, self.sizes, dim=1)
            out = [p.reshape(self._shape_with_rows(s, rows)) for p, s in zip(parts, self.shapes)]
        if self.container is None:
            return out[0]
        return self.container(out)

    def _shape_with_rows(self, shape: torch.Size, rows: int) -> torch.Size:
        if self.whole_state or len(shape) == 0:
            return shape
        return torch.Size((rows, *shape[1:]))

    def _describe(self) -> str:
        if self.container is None:
            return "a tensor"
        return f"a {self.container.__name__} of {len(self.shapes)} tensors"


def pack(state, whole_state: bool = False) -> tuple[torch.Tensor, StateLayout]:
    """Pack a tensor or tuple/list of tensors into one (B, D) matrix (B = 1 for whole_state)."""
    layout = StateLayout.of(state, whole_state)
    return layout.flatten(state, what="x0"), layout


def unpack(matrix: torch.Tensor, layout: StateLayout):
    """Inverse of `pack`: the matrix's rows back into the layout's tensor/tuple/list."""
    return layout.unflatten(matrix)


def _as_tensors(state, what: str):
    if torch.is_tensor(state):
        return [state], None
    if isinstance(state, (tuple, list)) and all(torch.is_tensor(t) for t in state):
        return list(state), type(state) if type(state) in (tuple, list) else tuple
    raise ValueError(f"{what} is {_describe(state)}: expected a tensor or a tuple/list of tensors")


def _rows(t: torch.Tensor) -> int:
    return _rows_of_shape(t.shape)


def _rows_of_shape(shape: torch.Size) -> int:
    return shape[0] if len(shape) >= 1 else 1


def _describe(obj) -> str:
    if torch.is_tensor(obj):
        return "a tensor"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"
