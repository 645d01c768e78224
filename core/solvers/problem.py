"""The fixed-point problem a solver works on: checked arguments, packed state, wrapped func.

`FixedPointProblem` does what every solver needs before its loop: it validates the
common arguments (ValueError saying what to change), rejects unknown keywords (see
`registry.check_options`), packs `x0` into a (B, D) matrix (`core.utils.flatten`), and
wraps `func` so the solver calls it on rows. The wrapper checks that `func` keeps the
state's structure, shape and dtype, counts calls, and with `batch_independent` passes
only the active rows to `func`.

Under torch.compile / torch.export (`core.utils.tracing`) every solve takes the sync-free
path by itself (eager bookkeeping on the host cannot be traced), `batch_independent`
falls back to masking (with one warning). A host check for convergence would be a graph
break inside the solver's loop, from which dynamo cannot resume (it then runs the loop
eagerly and compiles its helpers one by one), so a compiled solve with statistics
(fixed-point iteration, Anderson, Broyden) stops in a `torch.while_loop`
(`early_exit_loop`, `while_active`: on CPU by default, `check_every=0` turns it off, not
under autograd, not with `return_final`); otherwise (CUDA graphs by default, autograd) a
compiled solve runs its whole budget, masked. "Under autograd" means grad mode on at the
solver call: a DEQ's forward solve runs under no_grad (`DEQBase._solve`), so the compiled
training step's solve stops in the while loop too, although `func` closes over parameters
that require grad (test_compile: test_compiled_training_step_solve_stops_when_converged).
"""
from __future__ import annotations

import inspect

import torch

from core.utils import tracing
from core.utils.flatten import StateLayout

from .registry import check_options
from .stat import ConvergenceTracker, SyncFreeTracker, norm_dtype, stat_dtype

__all__ = ["FixedPointProblem", "check_tau"]


def x0_device(x0) -> torch.device:
    """The device of a state (a tensor or a tuple/list of tensors)."""
    return x0.device if torch.is_tensor(x0) else x0[0].device


def _accepts_rows(func) -> bool:
    """Whether func takes a `rows` keyword (the batch rows it is given, for batch_independent)."""
    try:
        return "rows" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class FixedPointProblem:
    """Validated inputs of one solve.

    Attributes: `layout` (how the state packs into rows), `z0` (B, D) packed initial state
    in the state dtype, `work_dtype` (float32 for float16/bfloat16 states so that solver
    algebra runs in float32, else the state dtype), and the common options.
    `complex_ok=False` makes a complex state an error naming the solvers that take one.
    """

    def __init__(self, name: str, func, x0, max_iter, tol, stop_mode, indexing, return_final,
                 sync_free, batch_independent, whole_state, extra: dict, complex_ok: bool = True):
        check_every = extra.pop("check_every", None)
        check_options(name, extra)
        if not callable(func):
            raise ValueError(f"{name}: func must be callable, got {type(func).__name__}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"{name}: max_iter must be an int >= 0, got {max_iter!r}")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ValueError(f"{name}: tol must be a number > 0, got {tol!r}")
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"{name}: stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        if indexing is not None and (
                isinstance(indexing, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexing)):
            raise ValueError(
                f"{name}: indexing must be None or a list of step numbers (ints >= 0), "
                f"got {indexing!r}")
        if sync_free and batch_independent:
            raise ValueError(
                f"{name}: sync_free=True needs static shapes and batch_independent=True drops "
                "rows; set one of them to False")
        if check_every is not None and (isinstance(check_every, bool)
                                        or not isinstance(check_every, int) or check_every < 0):
            raise ValueError(f"{name}: check_every must be None or an int >= 0 (0: never check, "
                             f"run the whole budget), got {check_every!r}")
        self.traced = tracing.tracing()
        if self.traced:
            if batch_independent:
                tracing.warn(f"{name}: batch_independent=True drops rows, which a compiled "
                             "graph cannot; under torch.compile converged samples are masked")
            sync_free, batch_independent = True, False
            if check_every is None:  # CPU: stop when converged; elsewhere (CUDA graphs): budget
                check_every = 1 if x0_device(x0).type == "cpu" else 0
            # the solvers with statistics stop in a torch.while_loop (`while_active`; no
            # autograd through it); solves under autograd run their whole budget
            self.early_exit_loop = (check_every > 0 and not torch.is_grad_enabled()
                                    and not return_final)
            self.loop_every = check_every  # steps a while-loop iteration runs (`while_active`)
            check_every = 0
        else:
            self.early_exit_loop = False
            self.loop_every = 0
        self.check_every = check_every or 0
        self.name = name
        self.func = func
        self.max_iter = max_iter
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.indexing = list(indexing) if indexing else []
        self.return_final = bool(return_final)
        self.sync_free = bool(sync_free)
        self.batch_independent = bool(batch_independent)
        self.pass_rows = self.batch_independent and _accepts_rows(func)
        self.layout = StateLayout.of(x0, whole_state=bool(whole_state))
        self.z0 = self.layout.flatten(x0, what="x0")
        self.dtype = self.z0.dtype
        if self.dtype.is_complex and not complex_ok:
            raise ValueError(
                f"{name} does not solve complex states (x0 is {self.dtype}); use "
                "fixed_point_iter, simple_fixed_point_iter or anderson")
        if not (self.dtype.is_floating_point or self.dtype.is_complex):
            raise ValueError(f"{name}: x0 must be floating point or complex, got {self.dtype}")
        self.work_dtype = torch.float32 if self.dtype in _LOW_PRECISION else self.dtype
        self.stat_dtype = stat_dtype(self.dtype)  # real, for residuals and traces
        self.norm_dtype = norm_dtype(self.dtype)  # `vector_norm(dtype=)`: complex for complex
        self.want = frozenset(self.indexing)  # steps whose best state is captured
        self.nfe = 0
        # False for solvers that write func's outputs into buffers in place (Anderson
        # and Broyden): autograd cannot follow them.
        self.differentiable = True

    def start_captures(self, state) -> dict:
        """The captured states before step 1: `state` at step 0 if `indexing` lists it."""
        return {0: state} if 0 in self.want else {}

    def tracker(self) -> ConvergenceTracker | SyncFreeTracker:
        """A fresh tracker for this problem's statistics, best state and early exit."""
        if self.sync_free:
            return SyncFreeTracker(self.z0, self.max_iter, self.tol, self.stop_mode,
                                   self.return_final, check_every=self.check_every)
        return ConvergenceTracker(self.z0, self.max_iter, self.tol, self.stop_mode,
                                  self.return_final)

    def call(self, z: torch.Tensor, tracker: ConvergenceTracker | None = None) -> torch.Tensor:
        """func on the rows of z (B, D), in the state dtype; returns f(z) as (B, D).

        With `batch_independent` and some rows stopped, only the active rows go through
        `func`; the stopped rows of the result are copies of their input rows. A `func`
        with a `rows` keyword is told which rows of the batch it gets (a LongTensor, or
        None for all), so it can index its per-sample inputs (the injection of a DEQ).
        """
        self.nfe += 1
        if (self.batch_independent and tracker is not None and not tracker.all_active):
            rows = tracker.active_rows()
            out = z.clone()
            if rows.numel():
                out.index_copy_(0, rows, self._call_rows(z.index_select(0, rows), rows))
            return out
        return self._call_rows(z, None)

    def call_pure(self, z: torch.Tensor) -> torch.Tensor:
        """func on all rows of z, changing nothing here (no call count): for the body of a
        `torch.while_loop`, which may not change outside objects."""
        out = self.func(self.layout.unflatten(z))
        return self.layout.flatten(out, rows=z.shape[0], what=f"{self.name}: func")

    def _call_rows(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        state = self.layout.unflatten(z)
        out = self.func(state, rows=rows) if self.pass_rows else self.func(state)
        out = self.layout.flatten(out, rows=z.shape[0], what=f"{self.name}: func")
        if self.nfe == 1 and not self.differentiable and out.requires_grad:
            raise RuntimeError(
                f"{self.name}: func's output requires grad, but {self.name} writes it into its "
                "history in place, which autograd cannot follow; run the solve under "
                "torch.no_grad() (a DEQ does, and differentiates the fixed point instead) or "
                "use fixed_point_iter to backpropagate through the iterations")
        return out

    def unpack(self, z: torch.Tensor):
        """A (B, D) matrix back into the structure of x0."""
        return self.layout.unflatten(z)

    def result(self, tracker: ConvergenceTracker, captured: dict[int, torch.Tensor], nfe=None):
        """The solver's return value: (best state, states at `indexing`, info with nfe:
        the calls counted here unless `nfe` is given)."""
        tracker.nfe = self.nfe if nfe is None else nfe
        return self.unpack(tracker.best), self.states_at(captured, tracker.best), tracker.info()

    def while_active(self, tracker: SyncFreeTracker, captured: dict, state: tuple, step):
        """Steps 2..max_iter as one `torch.while_loop` that stops when no sample is active:
        the early exit of a compiled solve (`early_exit_loop`; a host check in the loop
        would break the graph, from which dynamo cannot resume).

        `state` is the solver's tensors after step 1 (iterate, history, ...), `tracker` and
        `captured` hold step 1's results. `step(k, t, state) -> state` runs step k (a 0-dim
        tensor) on `t`, a tracker holding step k - 1's results: it calls `t.observe(k, ...)`
        once, `func` only through `call_pure`, and may change only tensors it makes (a
        while loop's body must be pure); every tensor it returns has its input's shape,
        dtype and strides. Returns a new tracker holding the last step's results (dynamo
        drops attributes set after a while loop on an object made before it) and the
        number of `func` calls, a tensor (one per step).

        One iteration of the loop runs `loop_every` steps (`check_every` under compile):
        fewer iterations for the loop's driver to run, the convergence test once an
        iteration. The (max_iter - 1) % loop_every steps that do not fill an iteration run
        first, before the loop, so the last iteration ends at `max_iter` exactly and no
        step runs past the budget; the steps after the last sample stops change nothing
        but are counted as `func` calls."""
        from torch._higher_order_ops.while_loop import while_loop

        every = max(self.loop_every, 1)
        lead = (self.max_iter - 1) % every
        n_state, n_track = len(state), len(tracker.CARRIED)
        active = n_state + tracker.CARRIED.index("active")
        later = [i for i in self.indexing if i >= 2]
        device = self.z0.device
        taken = tuple(tracker.best.clone() for _ in later)  # the states at `indexing` so far
        seen = tuple(torch.zeros((), dtype=torch.bool, device=device) for _ in later)

        def running(k, *carried):
            return (k < self.max_iter) & carried[active].any()

        def advance(count, k, *carried):
            """`count` steps after step k (a 0-dim tensor) from the carried tensors."""
            t = tracker.replica(carried[n_state:n_state + n_track], k)
            new_state = carried[:n_state]
            caps = carried[n_state + n_track:n_state + n_track + len(later)]
            flags = carried[n_state + n_track + len(later):]
            for _ in range(count):
                k = k + 1
                new_state = step(k, t, new_state)
                hit = [k == i for i in later]
                caps = tuple(torch.where(h, t.best, c) for h, c in zip(hit, caps))
                flags = tuple(f | h for f, h in zip(flags, hit))
            return (k, *new_state, *t.carry(), *caps, *flags)

        one = torch.ones((), dtype=torch.long, device=device)
        # clones: a while loop's inputs may not alias each other
        carried = (one, *[s.clone() for s in state], *[t.clone() for t in tracker.carry()], *taken, *seen)
        if lead:
            carried = advance(lead, *carried)

        def body(*carried):
            return advance(every, *carried)

        out = while_loop(running, body, carried)
        k = out[0]
        final = tracker.replica(out[1 + n_state:1 + n_state + n_track], k)
        final.settle(first=2)
        rest = out[1 + n_state + n_track:]
        for i, cap, flag in zip(later, rest[:len(later)], rest[len(later):]):
            captured[i] = torch.where(flag, cap, final.best)
        return final, k

    def states_at(self, captured: dict[int, torch.Tensor], final: torch.Tensor) -> list:
        """One state per entry of `indexing`: captured at that step, else the final best."""
        return [self.unpack(captured.get(i, final)) for i in self.indexing]


def check_tau(name: str, tau) -> None:
    """ValueError unless the damping `tau` is a number > 0."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"{name}: tau (damping) must be a number > 0, got {tau!r}")
