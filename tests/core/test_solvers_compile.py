"""Sync-free solvers under torch.compile(fullgraph=True) on CPU match eager mode.

fullgraph=True fails on any graph break, i.e. on any host synchronisation (`.item()`,
a Python branch on a tensor value) or dynamic shape in the loop. The default suite
traces with the `aot_eager` backend (the whole graph through AOTAutograd, ~10 s); the
inductor backend compiles C++ kernels and took 95-120 s per solver on the shared 2-core
machine, so it is marked slow. Without autograd, on CPU, a compiled solve stops in a
`torch.while_loop` when no sample is active (`FixedPointProblem.while_active`);
`check_every=0` keeps the fixed budget that CUDA graphs need.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from core.solvers import anderson, broyden, fixed_point_iter
from core.solvers.broyden import _ring_step

KEYS = ("abs_lowest", "rel_lowest", "nstep", "abs_trace", "rel_trace", "n_fallback")


def _problem():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    # samples of very different scale converge at different steps, exercising the masks
    x = torch.randn(8, 32, generator=gen) * torch.logspace(-4, 0, 8)[:, None]
    return lambda z: torch.tanh(z @ w.T + x)


def _check_compiled_matches_eager(solver, backend):
    func = _problem()
    torch._dynamo.reset()
    kwargs = dict(max_iter=10, tol=1e-4, indexing=[3, 10])
    eager = solver(func, torch.zeros(8, 32), **kwargs)
    compiled = torch.compile(lambda z0: solver(func, z0, sync_free=True, **kwargs),
                             fullgraph=True, backend=backend)
    z, states, info = compiled(torch.zeros(8, 32))
    assert eager[2]["nstep"].min() < 10 and eager[2]["nstep"].max() == 10  # some froze early
    assert (z - eager[0]).abs().max() < 1e-6
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(states, eager[1]))
    for key in KEYS:
        assert torch.allclose(info[key].double(), eager[2][key].double(), rtol=1e-5,
                              atol=1e-6), key


@pytest.mark.parametrize("solver", [fixed_point_iter, anderson, broyden],
                         ids=lambda s: s.__name__)
def test_sync_free_compiles_fullgraph_aot_eager(solver):
    _check_compiled_matches_eager(solver, "aot_eager")


def _contraction(tuple_state):
    """f with ||W||_2 = 0.5 (tuple: a second part y <- tanh(V y + z[:, :8]) / 2), samples
    of different scale: Anderson and Broyden converge to 1e-5 in about 10 steps."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=gen)
    w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(6, 32, generator=gen) * torch.logspace(-3, 0, 6)[:, None]
    if not tuple_state:
        return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(6, 32)
    v = 0.3 * torch.randn(8, 8, generator=gen) / 8**0.5
    return ((lambda s: (torch.tanh(s[0] @ w.T + x), torch.tanh(s[1] @ v.T + s[0][:, :8]) / 2)),
            (torch.zeros(6, 32), torch.zeros(6, 8)))


def _packed(state):
    return torch.cat([t.flatten(1) for t in state], 1) if isinstance(state, tuple) else state


def _compile_counted(fn, fullgraph):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=fullgraph, backend=counter), counter


# The tuple cases keep m=3 pairs / entries, so the ~10-step solve wraps the ring around
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks-allowed"])
@pytest.mark.parametrize("tuple_state", [False, True], ids=["tensor", "tuple"])
@pytest.mark.parametrize("solver", [anderson, broyden], ids=lambda s: s.__name__)
def test_compiled_anderson_and_broyden_stop_when_converged(solver, tuple_state, fullgraph):
    """Under torch.compile Anderson and Broyden stop in a torch.while_loop once no sample
    is active, as fixed-point iteration does (they ran all 40 steps before)."""
    func, z0 = _contraction(tuple_state)
    kwargs = dict(max_iter=40, tol=1e-5, indexing=[2, 5, 40], **({"m": 3} if tuple_state else {}))
    with torch.no_grad():
        eager = solver(func, z0, **kwargs)
        compiled, counter = _compile_counted(lambda z: solver(func, z, **kwargs), fullgraph)
        z, states, info = compiled(z0)
        z2, _, _ = compiled(z0)
    assert counter.frame_count == 1  # one graph, no recompilation on the second call
    assert (_packed(z) - _packed(eager[0])).abs().max() < 1e-5 and torch.equal(_packed(z), _packed(z2))
    assert all((_packed(a) - _packed(b)).abs().max() < 1e-5 for a, b in zip(states, eager[1]))
    assert info["abs_lowest"].max() < 1e-5
    assert torch.allclose(info["abs_lowest"], eager[2]["abs_lowest"], rtol=1e-3, atol=1e-7)
    assert int(info["nfe"]) <= 15 and int(info["nfe"]) == int(eager[2]["nfe"])
    assert info["nstep"].max() <= 15 and info["nstep"].min() < info["nstep"].max()
    assert info["abs_trace"].shape == (6, 41)  # padded past the last step, as eager


@pytest.mark.parametrize("m", [2, 3])
def test_compiled_broyden_wraps_its_ring(m):
    """m=2, 3 pairs: the ~10-step solve fills the ring, which the compiled loop writes in
    place and reads only where slots are in use (the products and K's solve, by opaque
    operators) until it is full, then whole with the spare masked; the result is eager's."""
    func, z0 = _contraction(False)
    kwargs = dict(max_iter=40, tol=1e-5, m=m, indexing=[2, 5, 40])
    with torch.no_grad():
        eager = broyden(func, z0, **kwargs)
        compiled, counter = _compile_counted(lambda z: broyden(func, z, **kwargs), fullgraph=True)
        z, states, info = compiled(z0)
    assert counter.frame_count == 1
    assert int(eager[2]["nfe"]) > m + 2  # the ring wrapped
    assert (z - eager[0]).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(states, eager[1]))
    assert int(info["nfe"]) == int(eager[2]["nfe"])
    assert torch.allclose(info["abs_trace"], eager[2]["abs_trace"], rtol=1e-3, atol=1e-7)


def _good_broyden_step(s, p, g):
    """g - P K^{-1} S^T g with K = S^T P - N, N_ij = s_i . s_j for i <= j: good Broyden's
    step from B_0 = -I and the pairs (s_i, p_i), columns of S and P (B, D, n) oldest first."""
    ks = s.transpose(1, 2) @ p - torch.triu(s.transpose(1, 2) @ s)
    coeffs = torch.linalg.solve(ks, s.transpose(1, 2) @ g.unsqueeze(2))
    return g - (p @ coeffs).squeeze(2)


@pytest.mark.parametrize("batch", [8, 100], ids=["numpy", "solve_ex"])
def test_ring_step_reads_only_the_slots_in_use(batch):
    """`_ring_step` (the compiled Broyden step, an opaque operator) with 1..6 pairs stored
    in a ring of 4 slots (m = 3) gives good Broyden's step from the last min(pairs, 3)
    pairs, whatever the ring and K hold outside the slots in use (NaN) and in the spare
    once the ring is full (stale values): computed from the newest pair's row and column
    of K, which it returns (zero past the slots in use; the row's diagonal entry is
    overwritten by the column's), and the older pairs' entries;
    eagerly (numpy up to 64 samples, else solve_ex) and inside a compiled graph."""
    gen = torch.Generator().manual_seed(3)
    slots, dim = 4, 5
    for pairs in (1, 2, 3, 4, 6):
        n, slot = min(pairs, slots), (pairs - 1) % slots
        full = pairs >= slots
        spare = (slot + 1) % slots if full else -1
        order = [(slot + 1 + i) % slots for i in range(slots)] if full else list(range(n))
        kept = [j for j in order if j != spare]  # oldest first
        memory = torch.full((2 * slots + 1, batch, dim), float("nan"))
        s = torch.randn(slots, batch, dim, generator=gen)
        p = -0.5 * s + 0.3 * torch.randn(slots, batch, dim, generator=gen)
        memory[0:2 * slots:2], memory[1:2 * slots:2] = s, p
        g = torch.randn(batch, dim, generator=gen)
        s_cols = torch.stack([s[j] for j in kept], dim=2)
        p_cols = torch.stack([p[j] for j in kept], dim=2)
        expected = _good_broyden_step(s_cols, p_cols, g)
        k_kept = s_cols.transpose(1, 2) @ p_cols - torch.triu(s_cols.transpose(1, 2) @ s_cols)
        system = torch.full((batch, slots, slots), float("nan"))
        for a, i in enumerate(kept):
            for b, j in enumerate(kept):
                if slot not in (i, j):  # the newest pair's row and column: the operator's
                    system[:, i, j] = k_kept[:, a, b]
        if full:  # the spare holds a stale pair: finite, never used
            memory[2 * spare:2 * spare + 2] = torch.randn(2, batch, dim, generator=gen)
            system[:, spare] = torch.randn(batch, slots, generator=gen)
            system[:, :, spare] = torch.randn(batch, slots, generator=gen)
        stage = torch.stack((s[slot], p[slot], g), dim=1)
        count = torch.tensor(pairs - 1)
        step, k_row, k_column = _ring_step(stage, memory, system, count)
        assert torch.allclose(step, expected, rtol=1e-4, atol=1e-4), pairs
        newest = kept.index(slot)
        for b, j in enumerate(kept):  # the diagonal entry is the column's
            assert j == slot or torch.allclose(k_row[:, 0, j], k_kept[:, newest, b], atol=1e-5)
            assert torch.allclose(k_column[:, j, 0], k_kept[:, b, newest], atol=1e-5)
        assert torch.all(k_row[:, 0, n:] == 0) and torch.all(k_column[:, n:] == 0)
        torch._dynamo.reset()
        compiled = torch.compile(lambda st, mem, k, c: _ring_step(st, mem, k, c + 0),
                                 fullgraph=True, backend="aot_eager")
        for got, want in zip(compiled(stage, memory, system, count), (step, k_row, k_column)):
            assert torch.equal(got, want)
    step, k_row, _ = _ring_step(stage, memory, system, torch.tensor(-1))  # no pair yet
    assert torch.equal(step, g) and torch.all(k_row == 0)


# max_iter 40: converged after about 10 steps; max_iter 7 (tol 1e-12): the budget ends
# the solve (steps 2..7: 6 % 3 = 0, 6 % 4 = 2 run before the loop)
@pytest.mark.parametrize("max_iter, tol", [(40, 1e-5), (7, 1e-12)], ids=["converges", "budget"])
@pytest.mark.parametrize("every", [3, 4])
@pytest.mark.parametrize("solver", [fixed_point_iter, anderson, broyden], ids=lambda s: s.__name__)
def test_compiled_check_every_runs_that_many_steps_per_loop_iteration(solver, every, max_iter, tol):
    """Under compile check_every=N runs N steps in each while-loop iteration, after the
    (max_iter - 1) % N steps that do not fill one: the result, the captured states and the
    statistics are eager's; no step runs past max_iter, and the steps after the stop
    change nothing and are counted as calls."""
    func, z0 = _contraction(False)
    kwargs = dict(max_iter=max_iter, tol=tol, indexing=[2, 5, max_iter])
    with torch.no_grad():
        eager = solver(func, z0, **kwargs)
        compiled, counter = _compile_counted(lambda z: solver(func, z, check_every=every, **kwargs),
                                             fullgraph=True)
        z, states, info = compiled(z0)
    assert counter.frame_count == 1
    assert (z - eager[0]).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(states, eager[1]))
    for key in ("nstep", "n_fallback"):
        assert torch.equal(info[key].double(), eager[2][key].double()), key
    for key in ("abs_lowest", "abs_trace", "rel_trace"):
        assert torch.allclose(info[key], eager[2][key], rtol=1e-3, atol=1e-7), key
    nfe, eager_nfe = int(info["nfe"]), int(eager[2]["nfe"])
    assert (nfe - 1 - (max_iter - 1) % every) % every == 0 and eager_nfe <= nfe < eager_nfe + every
    if max_iter == 40:
        assert eager_nfe < 20
    else:
        assert nfe == eager_nfe == max_iter  # the budget: not a call past it


@pytest.mark.parametrize("max_iter", [3, 6])
def test_compiled_steps_up_to_the_budget_keep_the_last_trace_row(max_iter):
    """check_every=4 with max_iter 3 (both steps before the loop) or 6 (one before it, an
    iteration of 4): the trace's last row is the last step's own. z -> A z with A a Jordan
    block: the residual falls at step 1 and rises at step 2, so the last row (0.75 at step
    3) is above the lowest (0.25), which a masked step past the budget would write there."""
    a = torch.tensor([[0.5, 3.0], [0.0, 0.5]])
    z0 = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    kwargs = dict(max_iter=max_iter, tol=1e-12, stop_mode="abs")
    with torch.no_grad():
        eager = fixed_point_iter(lambda z: z @ a.T, z0, **kwargs)
        compiled, _ = _compile_counted(
            lambda z: fixed_point_iter(lambda y: y @ a.T, z, check_every=4, **kwargs),
            fullgraph=True)
        info = compiled(z0)[2]
    last = eager[2]["abs_trace"][:, -1]
    assert torch.all(last > 1.4 * eager[2]["abs_lowest"]), eager[2]["abs_trace"]
    assert int(info["nfe"]) == max_iter  # no step past the budget
    for key in ("abs_trace", "rel_trace", "abs_lowest"):
        assert torch.allclose(info[key], eager[2][key], rtol=1e-6), key


@pytest.mark.parametrize("solver", [anderson, broyden], ids=lambda s: s.__name__)
def test_compiled_check_every_0_runs_the_whole_budget(solver):
    func, z0 = _contraction(False)
    kwargs = dict(max_iter=14, tol=1e-5, m=3)  # short: the fixed budget is traced unrolled
    with torch.no_grad():
        eager = solver(func, z0, **kwargs)
        compiled, counter = _compile_counted(lambda z: solver(func, z, check_every=0, **kwargs),
                                             fullgraph=True)
        z, _, info = compiled(z0)
    assert int(info["nfe"]) == 14 and int(eager[2]["nfe"]) <= 11
    assert (z - eager[0]).abs().max() < 1e-5 and info["abs_lowest"].max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("solver", [fixed_point_iter, anderson], ids=lambda s: s.__name__)
def test_sync_free_compiles_fullgraph_inductor(solver):
    _check_compiled_matches_eager(solver, "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("solver", [fixed_point_iter, anderson], ids=lambda s: s.__name__)
def test_solvers_on_cuda_match_cpu_and_capture_in_cuda_graphs(solver):
    func_cpu = _problem()
    eager_cpu = solver(func_cpu, torch.zeros(8, 32), max_iter=10, tol=1e-4)
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=gen)
    w = (0.9 * w / torch.linalg.matrix_norm(w, 2)).to(device)
    x = (torch.randn(8, 32, generator=gen) * torch.logspace(-4, 0, 8)[:, None]).to(device)
    func = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731  (the same problem on the GPU)
    eager = solver(func, torch.zeros(8, 32, device=device), max_iter=10, tol=1e-4)
    assert (eager[0].cpu() - eager_cpu[0]).abs().max() < 1e-5
    torch._dynamo.reset()
    graphed = torch.compile(lambda z0: solver(func, z0, max_iter=10, tol=1e-4, sync_free=True),
                            fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        z, _, info = graphed(torch.zeros(8, 32, device=device))
    assert (z - eager[0]).abs().max() < 1e-5
    assert torch.allclose(info["nstep"], eager[2]["nstep"])


def _hard_rows():
    """Six samples that exercise every branch of the loop's bookkeeping: three tanh
    contractions of different scale (stop apart), one non-normal contraction whose
    residual rises for several steps before it falls (its lowest residual is not its
    last while it rises), one with no fixed point (z^2 + z + 1: caught by the divergence
    limit in the loop) and one that turns NaN once it moves (caught at step 2)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=gen)
    w = 0.5 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(3, 8, generator=gen) * torch.logspace(-3, 0, 3)[:, None]
    shear = 0.5 * torch.eye(8)
    shear[0, 1] = 6.0
    start = torch.zeros(6, 8)
    start[3, 1] = 1.0

    def func(z):
        tanh_rows = torch.tanh(z[:3] @ w.T + x)
        transient = z[3:4] @ shear.T + 1  # fixed point away from 0: rel is meaningful
        diverging = z[4:5] * z[4:5] + z[4:5] + 1
        blowing_up = torch.where(z[5:].abs() > 0.5, torch.nan, 1.0)
        return torch.cat((tanh_rows, transient, diverging, blowing_up))
    return func, start


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("solver", [fixed_point_iter, anderson, broyden], ids=lambda s: s.__name__)
def test_compiled_loop_keeps_safety_net_and_lowest_step(solver, stop_mode):
    """In the while loop the step of the lowest residual and the caught samples are read
    off the trace after the loop (`SyncFreeTracker.settle`), not updated at every step:
    they equal eager's step-by-step ones for samples that stop, diverge, turn NaN, or
    whose residual rises before it falls."""
    func, z0 = _hard_rows()
    kwargs = dict(max_iter=30, tol=1e-6, stop_mode=stop_mode)
    with torch.no_grad():
        eager = solver(func, z0, **kwargs)
        compiled, counter = _compile_counted(lambda z: solver(func, z, **kwargs), fullgraph=True)
        z, _, info = compiled(z0)
    assert counter.frame_count == 1
    if solver is fixed_point_iter:  # the rows do what their names say
        assert int(eager[2]["n_fallback"]) == 2
        assert 1 < float(eager[2]["nstep"][3]) < 30 and float(eager[2]["nstep"][4]) < 12
    assert int(eager[2]["n_fallback"]) >= 1
    for key in ("nstep", "n_fallback"):
        assert torch.equal(info[key].double(), eager[2][key].double()), key
    finite = torch.isfinite(eager[0])
    assert torch.equal(torch.isfinite(z), finite)
    assert torch.allclose(z[finite], eager[0][finite], rtol=1e-5, atol=1e-6)
    # Anderson's and Broyden's compiled small solves round apart from eager's at 1e-8;
    # the rows of scale 1e-3 make that 1e-5 relative
    for key, atol in (("abs_lowest", 1e-6), ("rel_lowest", 1e-3)):
        assert torch.allclose(info[key], eager[2][key], rtol=1e-4, atol=atol), key
