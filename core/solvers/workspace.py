"""Scratch memory that solves on CPU lend to each other: no page faults on every solve.

Anderson's history and Broyden's ring are the largest memory of a solve (m states per
sample), written one slot per step. A fresh CPU allocation of that size is mapped from
the OS untouched, so the first write to each of its pages is a page fault: measured on
the solver race's conv cell (16 x 8192 float32 state), writing a 512 KB slot took
115-250 us when fresh and 35-45 us when the memory had been written before, a third of
Anderson's time outside `func`. CUDA's caching allocator already reuses device memory;
`lend` does the same for the solvers' scratch buffers on CPU: each thread keeps the
buffers its last solves gave back (at most `limit()` bytes together, default 256 MiB) and
lends one to the next solve that needs no more than its size.

A lent buffer is never returned to the caller of a solver (solvers return `func`
outputs or fresh tensors), and a solve nested in another's `func` gets its own. Buffers
are lent only to eager solves with autograd off (the solvers run under `no_grad`), so no
autograd graph ever references them, and they are allocated outside inference mode, so
a solve under `torch.inference_mode` and a later one under `no_grad` can share them.

    with lend((2, batch, m, dim), torch.float32, device) as buf: ...
    core.solvers.workspace.set_limit(0)  # keep nothing between solves
"""
from __future__ import annotations

import math
import threading

import torch

__all__ = ["lend", "set_limit", "limit", "clear", "cached_bytes"]

_state = threading.local()
_limit_bytes = 256 * 2**20


def _free() -> list[torch.Tensor]:
    """This thread's buffers not lent out, oldest first (flat tensors)."""
    if not hasattr(_state, "free"):
        _state.free = []
    return _state.free


def set_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of scratch memory per thread between solves (0: none)."""
    global _limit_bytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"workspace limit must be an int >= 0 (bytes), got {nbytes!r}")
    _limit_bytes = nbytes
    _trim(_free())


def limit() -> int:
    """The per-thread limit in bytes."""
    return _limit_bytes


def clear() -> None:
    """Release this thread's kept buffers."""
    _free().clear()


def cached_bytes() -> int:
    """Bytes this thread keeps for the next solves."""
    return sum(_nbytes(t) for t in _free())


class lend:
    """An uninitialised tensor of `shape` for the duration of a `with` block.

    On CPU, in eager mode with autograd off, it is a kept buffer when one is large enough
    (and goes back to the pool afterwards); otherwise a fresh `torch.empty`. (A class
    rather than a generator context manager: it runs on every solve.)
    """

    __slots__ = ("shape", "dtype", "device", "_buf")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self._buf = None

    def __enter__(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        if not _poolable(self.device, numel * self.dtype.itemsize):
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        free = _free()
        best = None
        for i, t in enumerate(free):
            if t.dtype == self.dtype and t.numel() >= numel and (
                    best is None or t.numel() < free[best].numel()):
                best = i
        if best is None:
            with torch.inference_mode(False):
                self._buf = torch.empty(numel, dtype=self.dtype, device=self.device)
        else:
            self._buf = free.pop(best)
        return self._buf[:numel].view(self.shape)

    def __exit__(self, *exc_info) -> None:
        if self._buf is not None:
            free = _free()
            free.append(self._buf)
            self._buf = None
            _trim(free)


def _poolable(device: torch.device, nbytes: int) -> bool:
    return (device.type == "cpu" and nbytes <= _limit_bytes
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _trim(free: list[torch.Tensor]) -> None:
    """Drop the oldest kept buffers until the rest fit the limit."""
    while free and sum(_nbytes(t) for t in free) > _limit_bytes:
        free.pop(0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
