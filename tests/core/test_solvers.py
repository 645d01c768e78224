"""Solvers against known fixed points: linear systems, tanh layers, tuple and coupled states."""
import pytest
import torch

from core.solvers import (anderson, broyden, fixed_point_iter, get_solver,
                          simple_fixed_point_iter, solver_stat_from_final_step)

STAT_SOLVERS = [fixed_point_iter, anderson, broyden]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are small: one thread avoids OpenMP contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Counting:
    """Wraps func; records every (input, output) pair so tests can replay the solve."""

    def __init__(self, func):
        self.func = func
        self.calls = []

    def __call__(self, z, rows=None):
        out = self.func(z) if rows is None else self.func(z, rows=rows)
        self.calls.append((z.detach().clone(), out.detach().clone()))
        return out


def symmetric_contraction(dim, norm, dtype=torch.float64, seed=0):
    """A symmetric matrix with eigenvalues spread over [-norm, norm] (so ||A||_2 = norm)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))
    return q @ torch.diag(torch.linspace(-norm, norm, dim, dtype=dtype)) @ q.T


@pytest.fixture(scope="module")
def linear_problem():
    dim = 1000
    a = symmetric_contraction(dim, 0.9)
    b = torch.randn(2, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T
    return a, b, exact


def test_linear_system_all_solvers_reach_dense_solution(linear_problem):
    a, b, exact = linear_problem
    assert torch.linalg.matrix_norm(a, 2).item() == pytest.approx(0.9, rel=1e-9)
    calls = {}
    for solver in STAT_SOLVERS:
        func = Counting(lambda z: z @ a.T + b)
        z, _, info = solver(func, torch.zeros_like(b), max_iter=400, tol=1e-8)
        residual = torch.linalg.vector_norm(z @ a.T + b - z, dim=1)
        assert residual.max() < 1e-6, solver.__name__
        assert (z - exact).abs().max() < 1e-5, solver.__name__
        assert info["nfe"] == len(func.calls)
        assert info["abs_lowest"].max() < 1e-8
        calls[solver.__name__] = len(func.calls)
    assert calls["anderson"] < calls["fixed_point_iter"] / 1.5
    assert calls["broyden"] < calls["fixed_point_iter"] / 1.5


def test_simple_fixed_point_reports_final_residual(linear_problem):
    a, b, exact = linear_problem
    func = Counting(lambda z: z @ a.T + b)
    z, states, info = simple_fixed_point_iter(func, torch.zeros_like(b), max_iter=250,
                                              indexing=[1, 250])
    assert (z - exact).abs().max() < 1e-5
    assert torch.equal(states[1], z)
    assert torch.equal(states[0], b)  # one step from zero
    assert info["nfe"] == 250 == len(func.calls)
    assert (info["nstep"] == 250).all()
    last_in, last_out = func.calls[-1]
    assert torch.allclose(info["abs_lowest"], torch.linalg.vector_norm(last_out - last_in, dim=1))


def test_broyden_matches_torchdeq_full_memory_trace(linear_problem):
    torchdeq_solver = pytest.importorskip("torchdeq.solver")
    a, b, _ = linear_problem
    func = lambda z: z @ a.T + b  # noqa: E731
    _, _, ours = broyden(func, torch.zeros_like(b), max_iter=30, tol=1e-12, m=40)
    _, _, theirs = torchdeq_solver.get_solver("broyden")(func, torch.zeros_like(b), max_iter=30,
                                                        tol=1e-12)
    # TorchDEQ evaluates x0 before its loop without recording it: its step k is our k + 1.
    assert torch.allclose(ours["abs_trace"][:, 2:30], theirs["abs_trace"][:, 1:29], rtol=1e-8)


def _dense_good_broyden_residuals(func, x, steps, m):
    """||g(x_k)|| for k = 1..steps of good Broyden on one sample (D,), with the dense
    Jacobian estimate of the last m pairs, B = -I + (Y + S) N^{-1} S^T (N: the upper
    triangle of S^T S), and x_{k+1} = x_k - B^{-1} g(x_k)."""
    xs, gs = [x], [func(x) - x]
    for _ in range(steps - 1):
        n = min(len(xs) - 1, m)
        if n == 0:
            step = gs[-1]
        else:
            s = torch.stack([xs[i + 1] - xs[i] for i in range(len(xs) - 1 - n, len(xs) - 1)], 1)
            y = torch.stack([gs[i + 1] - gs[i] for i in range(len(gs) - 1 - n, len(gs) - 1)], 1)
            jac = -torch.eye(len(x), dtype=x.dtype) + (y + s) @ torch.linalg.solve(
                torch.triu(s.T @ s), s.T)
            step = -torch.linalg.solve(jac, gs[-1])
        xs.append(xs[-1] + step)
        gs.append(func(xs[-1]) - xs[-1])
    return torch.stack([torch.linalg.vector_norm(g) for g in gs])


def test_broyden_keeps_exactly_the_last_m_pairs():
    # Broyden's ring has m + 1 slots, one spare, and wraps: every step after the first m
    # drops the oldest pair. It must be good Broyden from the last m pairs exactly.
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    w = 0.95 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    x0 = torch.zeros(6, dtype=torch.float64)
    steps = 11
    for m in (1, 2, 3):
        _, _, info = broyden(lambda z: torch.tanh(z @ w.T + x), torch.zeros(2, 6, dtype=torch.float64),
                             max_iter=steps, tol=1e-15, m=m)
        for b in range(2):
            expected = _dense_good_broyden_residuals(lambda z: torch.tanh(w @ z + x[b]), x0, steps, m)
            assert torch.allclose(info["abs_trace"][b, 1:steps + 1], expected, rtol=1e-7,
                                  atol=1e-13), (m, b)
    # the memory limit matters on this problem: full memory takes another path
    sample = lambda z: torch.tanh(w @ z + x[1])  # noqa: E731
    full = _dense_good_broyden_residuals(sample, x0, steps, steps)
    assert not torch.allclose(full, _dense_good_broyden_residuals(sample, x0, steps, 3), rtol=1e-3)


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
def test_tanh_layer_every_sample_converges_to_its_best_iterate(solver):
    gen = torch.Generator().manual_seed(0)
    dim, batch, tol = 48, 64, 1e-5
    w = torch.randn(dim, dim, generator=gen)
    w = 0.95 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(batch, dim, generator=gen) * torch.linspace(0.1, 3, batch)[:, None]
    func = Counting(lambda z: torch.tanh(z @ w.T + x))
    z, _, info = solver(func, torch.zeros(batch, dim), max_iter=200, tol=tol)
    assert (info["abs_lowest"] < tol).all()
    # Replay: each sample's candidates up to the step it first met tol; the returned state
    # must be the candidate with the lowest residual, at the reported step.
    ins = torch.stack([c[0] for c in func.calls])
    outs = torch.stack([c[1] for c in func.calls])
    res = torch.linalg.vector_norm(outs - ins, dim=2)  # (steps, batch)
    candidates = ins if solver is broyden else outs
    for i in range(batch):
        first = int((res[:, i] < tol).nonzero()[0])
        best = int(res[: first + 1, i].argmin())
        assert torch.equal(z[i], candidates[best, i]), i
        assert info["nstep"][i].item() == best + 1
        assert info["abs_lowest"][i].item() == pytest.approx(res[best, i].item(), rel=1e-5)
    assert torch.linalg.vector_norm(torch.tanh(z @ w.T + x) - z, dim=1).max() < tol


def _easy_hard():
    """Diagonal linear map: sample 0 contracts by 0.1 per step, sample 1 by 0.3 to 0.95."""
    rate = torch.stack([torch.full((8,), 0.1, dtype=torch.float64),
                        torch.linspace(0.3, 0.95, 8, dtype=torch.float64)])
    shift = torch.ones(2, 8, dtype=torch.float64)

    def func(z, rows=None):  # `rows`: which samples of the batch z holds (batch_independent)
        if rows is None:
            return rate * z + shift
        return rate[rows] * z + shift[rows]

    return func, rate


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
def test_easy_sample_stops_early_and_is_frozen(solver):
    func, _ = _easy_hard()
    counting = Counting(func)
    z, states, info = solver(counting, torch.zeros(2, 8, dtype=torch.float64), max_iter=300,
                             tol=1e-6, indexing=[2, 5, 10, 200, 1000])
    easy_step, hard_step = info["nstep"].tolist()
    assert easy_step < hard_step
    assert len(states) == 5
    for state in states[2:]:
        assert torch.equal(state[0], z[0])  # bit-identical once converged
    assert torch.equal(states[-1], z)  # a step past the end repeats the best state
    # the frozen sample's input rows never change after it converged
    frozen_inputs = [c[0][0] for c in counting.calls[int(easy_step) + 1:]]
    assert all(torch.equal(r, frozen_inputs[0]) for r in frozen_inputs)
    assert (info["abs_trace"][0, int(easy_step):] == info["abs_lowest"][0]).all()
    assert info["abs_trace"].shape == (2, 301)


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
def test_batch_independent_shrinks_func_batch(solver):
    func, _ = _easy_hard()
    counting = Counting(func)
    z, _, info = solver(counting, torch.zeros(2, 8, dtype=torch.float64), max_iter=300,
                        tol=1e-6, batch_independent=True)
    rows = [c[0].shape[0] for c in counting.calls]
    assert rows[0] == 2 and rows[-1] == 1
    assert rows.count(2) == int(info["nstep"][0].item())
    ref, _, _ = solver(func, torch.zeros(2, 8, dtype=torch.float64), max_iter=300, tol=1e-6)
    assert torch.equal(z, ref)


@pytest.mark.parametrize("solver", STAT_SOLVERS + [simple_fixed_point_iter],
                         ids=lambda s: s.__name__)
def test_tuple_state_round_trips(solver):
    # z1 = 0.5 z1 + 1 -> 2;  z2 = 0.5 z2 + mean(z1) / 4 -> mean(z1) / 2 = 1 at the fixed point
    def func(zs):
        z1, z2 = zs
        return (0.5 * z1 + 1, 0.5 * z2 + z1.mean(dim=(1, 2))[:, None] / 4)

    x0 = (torch.zeros(3, 2, 4, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64))
    z, _, info = solver(func, x0, max_iter=100, tol=1e-10)
    assert isinstance(z, tuple) and [t.shape for t in z] == [(3, 2, 4), (3, 5)]
    assert torch.allclose(z[0], torch.full_like(z[0], 2.0), atol=1e-8)
    assert torch.allclose(z[1], torch.full_like(z[1], 1.0), atol=1e-8)
    assert info["abs_lowest"].shape == (3,)


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("shape", [(), (3,), (3, 4), (3, 2, 4, 4)], ids=str)
def test_single_tensor_states_keep_their_shape(solver, shape):
    seen = []

    def func(z):
        seen.append(z.shape)
        return 0.5 * z + 1

    z, _, info = solver(func, torch.zeros(shape, dtype=torch.float64), max_iter=100, tol=1e-10)
    assert z.shape == shape and set(seen) == {shape}
    assert torch.allclose(z, torch.full(shape, 2.0, dtype=torch.float64), atol=1e-8)
    assert info["abs_lowest"].shape == ((shape[0],) if shape else (1,))


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
def test_whole_state_solves_coupled_system(solver):
    # samples coupled through a normalised adjacency: z = 0.8 P z + c
    gen = torch.Generator().manual_seed(3)
    batch, dim = 6, 5
    adj = torch.rand(batch, batch, generator=gen, dtype=torch.float64)
    p = adj / adj.sum(dim=1, keepdim=True)
    c = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(batch, dtype=torch.float64) - 0.8 * p, c)
    z, _, info = solver(lambda z: 0.8 * p @ z + c, torch.zeros(batch, dim, dtype=torch.float64),
                        max_iter=200, tol=1e-10, whole_state=True)
    assert info["abs_lowest"].shape == (1,) and info["abs_trace"].shape == (1, 201)
    assert torch.allclose(z, exact, atol=1e-8)


@pytest.mark.parametrize("solver", [anderson, broyden], ids=lambda s: s.__name__)
def test_bfloat16_state_converges(solver):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(16, 64, generator=gen)
    ref, _, _ = solver(lambda z: torch.tanh(z @ w.T + x), torch.zeros(16, 64), max_iter=100,
                       tol=1e-6)
    wb, xb = w.bfloat16(), x.bfloat16()
    z, _, info = solver(lambda z: torch.tanh(z @ wb.T + xb), torch.zeros(16, 64,
                                                                         dtype=torch.bfloat16),
                        max_iter=60, tol=1e-2, stop_mode="rel")
    assert z.dtype == torch.bfloat16 and info["rel_lowest"].dtype == torch.float32
    assert (info["rel_lowest"] < 1e-2).all()
    assert info["nfe"] < 60
    rel_err = torch.linalg.vector_norm(z.float() - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)
    assert rel_err.max() < 3e-2


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
def test_safety_net_freezes_diverging_and_nonfinite_samples(solver):
    # sample 0 converges; sample 1's residual grows 10x per call whatever the solver does
    # (caught once it exceeds 1e3 x its first residual); sample 2 turns NaN at call 3
    step = {"k": 0}

    def func(z):
        step["k"] += 1
        out = torch.stack([0.5 * z[0] + 1, z[1] + 10.0 ** step["k"],
                           0.5 * torch.cos(z[2]) + 1])
        if step["k"] >= 3:
            out[2] = float("nan")
        return out

    z, _, info = solver(func, torch.zeros(3, 4, dtype=torch.float64), max_iter=100, tol=1e-8)
    assert info["n_fallback"].item() == 2
    assert torch.allclose(z[0], torch.full((4,), 2.0, dtype=torch.float64), atol=1e-7)
    assert torch.isfinite(z).all() and torch.isfinite(info["abs_lowest"]).all()
    # the diverging sample keeps its best state: residual no worse than the first one
    assert info["abs_lowest"][1] <= info["abs_trace"][1, 1]


@pytest.mark.parametrize("m", [4, 12], ids=["lu", "cholesky"])
def test_anderson_singular_histories_never_raise(m):
    # lam=0: f(z) = c makes the newest residual exactly zero (a zero Gram row), and
    # f(z) = z + d (no fixed point) repeats one residual (a rank-one Gram matrix)
    c = torch.linspace(-1, 1, 8, dtype=torch.float64).repeat(3, 1)
    z, _, info = anderson(lambda z: torch.zeros_like(z) + c, torch.zeros_like(c), max_iter=30,
                          tol=1e-12, m=m, lam=0.0)
    assert torch.equal(z, c) and info["n_fallback"].item() == 0
    d = torch.full_like(c, 0.25)
    z, _, info = anderson(lambda z: z + d, torch.zeros_like(c), max_iter=3 * m, tol=1e-12,
                          m=m, lam=0.0)
    assert torch.isfinite(z).all() and info["nfe"] == 3 * m
    assert torch.allclose(info["abs_lowest"], torch.full((3,), 0.25 * 8 ** 0.5, dtype=torch.float64))


def test_return_final_runs_all_steps_and_returns_last():
    func, _ = _easy_hard()
    counting = Counting(func)
    z, _, info = fixed_point_iter(counting, torch.zeros(2, 8, dtype=torch.float64), max_iter=20,
                                  tol=1e-3, return_final=True)
    assert len(counting.calls) == 20
    assert torch.equal(z, counting.calls[-1][1])
    assert (info["nstep"] == 20).all()


def test_sync_free_matches_eager_without_compile():
    func, _ = _easy_hard()
    for solver in STAT_SOLVERS:
        eager = solver(func, torch.zeros(2, 8, dtype=torch.float64), max_iter=60, tol=1e-6,
                       indexing=[3, 40])
        free = solver(func, torch.zeros(2, 8, dtype=torch.float64), max_iter=60, tol=1e-6,
                      indexing=[3, 40], sync_free=True)
        # Not bitwise: sync-free Anderson solves its small system with other arithmetic,
        # and eager Broyden with numpy's LU (its rounding, amplified by K's condition,
        # reaches about 1e-10 near the noise floor; a change of algorithm shows at O(1)).
        close = dict(rtol=1e-9, atol=1e-12 if solver is not broyden else 1e-9)
        assert torch.allclose(eager[0], free[0], **close), solver.__name__
        assert all(torch.allclose(a, b, **close) for a, b in zip(eager[1], free[1]))
        assert torch.equal(eager[2]["nstep"], free[2]["nstep"])
        for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace"):
            assert torch.allclose(eager[2][key], free[2][key], **close), (solver.__name__, key)
        assert free[2]["nfe"] == 60


def test_max_iter_zero_returns_x0():
    x0 = torch.randn(3, 4)
    for name in ("fixed_point_iter", "anderson", "broyden", "simple_fixed_point_iter"):
        z, states, info = get_solver(name)(torch.tanh, x0, max_iter=0, indexing=[0, 1])
        assert torch.equal(z, x0) and len(states) == 2 and info["nfe"] == 0


def test_solver_stat_from_final_step():
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    fz = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    info = solver_stat_from_final_step(z, fz, nstep=7)
    assert torch.allclose(info["abs_lowest"], torch.tensor([5.0, 0.0]))
    assert torch.allclose(info["rel_lowest"], torch.tensor([5.0 / 4.0, 0.0]))
    assert info["abs_trace"].shape == (2, 1) and (info["nstep"] == 7).all()
    tup = solver_stat_from_final_step((z, z[:, :1]), (fz, fz[:, :1]))
    assert torch.allclose(tup["abs_lowest"], torch.tensor([34.0 ** 0.5, 0.0]))


@pytest.mark.parametrize("solver", STAT_SOLVERS, ids=lambda s: s.__name__)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_device_path_of_the_tracker_matches_the_cpu_path(solver, stop_mode, monkeypatch):
    # On CPU the solvers write their norms straight into the tracker's host trace; on
    # other devices the tracker copies them over. CI has no GPU, so the copying path is
    # run here on CPU, with a batch whose samples stop at different steps.
    from core.solvers import stat

    func, _ = _easy_hard()
    x0 = torch.zeros(2, 8, dtype=torch.float64)
    expected = solver(func, x0, max_iter=60, tol=1e-9, stop_mode=stop_mode, indexing=[3])
    init = stat.ConvergenceTracker.__init__

    def without_shared_trace(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._trace_tensor = None

    monkeypatch.setattr(stat.ConvergenceTracker, "__init__", without_shared_trace)
    copied = solver(func, x0, max_iter=60, tol=1e-9, stop_mode=stop_mode, indexing=[3])
    assert torch.equal(copied[0], expected[0]) and torch.equal(copied[1][0], expected[1][0])
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep"):
        assert torch.equal(copied[2][key], expected[2][key]), key
    assert expected[2]["nstep"][0] < expected[2]["nstep"][1]  # the samples did stop apart
