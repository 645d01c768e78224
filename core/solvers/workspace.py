"""Solver state that eager CPU solves keep between them: no page faults, no views per step.

Anderson's history and Broyden's ring are the largest memory of a solve (m states per
sample), written one slot per step. A fresh CPU allocation of that size is mapped from
the OS untouched, so the first write to each of its pages is a page fault: measured on
the solver race's conv cell (16 x 8192 float32 state), writing a 512 KB slot took
115-250 us when fresh and 35-45 us when the memory had been written before, a third of
Anderson's time outside `func`. And the views a step reads (slots, prefixes,
transposes) cost 2-5 us each to cut on CPU, as much as a small kernel. CUDA's caching
allocator already reuses device memory; `reuse` keeps, per thread, the objects holding a
solver's buffers and views (at most `limit()` bytes together, default 256 MiB, oldest
dropped first), keyed by configuration, and lends one to the next solve with the same
key (measured on the conv cell: Broyden's time outside `func` 0.75 -> 0.55 of the time
inside, Anderson's 0.55 -> 0.48).

A kept object is lent to one solve at a time (a solve nested in another's `func` builds
its own), its buffers are never returned to the caller of a solver (solvers return
`func` outputs or fresh tensors), and the solver resets whatever state it carries.
Objects are kept only for eager solves with autograd off (the solvers run under
`no_grad`), so no autograd graph ever references them, and they are built outside
inference mode, so a solve under `torch.inference_mode` and a later one under `no_grad`
can share them.

    with reuse(("broyden", m, batch, dim, dtype, device), nbytes, device, build) as ring: ...
    core.solvers.workspace.set_limit(0)  # keep nothing between solves
"""
from __future__ import annotations

import threading

import torch

__all__ = ["reuse", "set_limit", "limit", "clear", "cached_bytes"]

_state = threading.local()
_limit_bytes = 256 * 2**20


class _Kept:
    """A kept object, its key and its size."""

    __slots__ = ("key", "value", "nbytes")

    def __init__(self, key, value, nbytes: int):
        self.key, self.value, self.nbytes = key, value, nbytes


def _free() -> list[_Kept]:
    """This thread's kept objects not lent out, oldest first."""
    if not hasattr(_state, "free"):
        _state.free = []
    return _state.free


def set_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of solver state per thread between solves (0: none)."""
    global _limit_bytes
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"workspace limit must be an int >= 0 (bytes), got {nbytes!r}")
    _limit_bytes = nbytes
    _trim(_free())


def limit() -> int:
    """The per-thread limit in bytes."""
    return _limit_bytes


def clear() -> None:
    """Release this thread's kept objects."""
    _free().clear()


def cached_bytes() -> int:
    """Bytes this thread keeps for the next solves."""
    return sum(item.nbytes for item in _free())


class reuse:
    """The object `build()` makes, for the duration of a `with` block, kept afterwards for
    the next block with the same `key`.

    Kept only on CPU, in eager mode with autograd off, and when `nbytes` (its size,
    counted against the limit) fits the limit; otherwise every block builds its own.
    (A class rather than a generator context manager: it runs on every solve.)
    """

    __slots__ = ("key", "nbytes", "device", "build", "_item")

    def __init__(self, key, nbytes: int, device: torch.device, build):
        self.key, self.nbytes, self.device, self.build = key, nbytes, torch.device(device), build
        self._item = None

    def __enter__(self):
        if not _keepable(self.device, self.nbytes):
            return self.build()
        free = _free()
        for i, item in enumerate(free):
            if item.key == self.key:
                self._item = free.pop(i)
                return self._item.value
        with torch.inference_mode(False):
            self._item = _Kept(self.key, self.build(), self.nbytes)
        return self._item.value

    def __exit__(self, *exc_info) -> None:
        if self._item is not None:
            free = _free()
            free.append(self._item)
            self._item = None
            _trim(free)


def _keepable(device: torch.device, nbytes: int) -> bool:
    return (device.type == "cpu" and nbytes <= _limit_bytes
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


def _trim(free: list[_Kept]) -> None:
    """Drop the oldest kept objects until the rest fit the limit."""
    while free and sum(item.nbytes for item in free) > _limit_bytes:
        free.pop(0)
