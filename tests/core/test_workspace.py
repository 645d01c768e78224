"""The solver state kept between solves (`core.solvers.workspace`): reuse, isolation, limits."""
import pytest
import torch

from core.solvers import anderson, broyden, workspace


@pytest.fixture(autouse=True)
def fresh_pool():
    limit = workspace.limit()
    workspace.clear()
    yield
    workspace.set_limit(limit)
    workspace.clear()


def test_a_tensor_kept_from_inference_mode_is_writable_later_under_no_grad():
    def build():
        return torch.empty(8)

    with torch.inference_mode():
        with workspace.reuse("buffer", 32, "cpu", build) as buf:
            buf.fill_(1.0)
    with torch.no_grad(), workspace.reuse("buffer", 32, "cpu", build) as again:
        assert again is buf
        again.fill_(2.0)  # an inference tensor would raise here
        assert not again.is_inference()


def test_a_reused_object_is_built_once_per_key_and_lent_to_one_block_at_a_time():
    builds = []

    def build():
        builds.append(object())
        return builds[-1]

    with torch.no_grad():
        with workspace.reuse("ring", 1000, "cpu", build) as first:
            with workspace.reuse("ring", 1000, "cpu", build) as nested:
                assert nested is not first  # in use: a nested block builds its own
        assert len(builds) == 2 and workspace.cached_bytes() == 2000
        with workspace.reuse("ring", 1000, "cpu", build) as again:
            assert again in builds
        with workspace.reuse("other", 1000, "cpu", build) as other:
            assert other not in builds[:2]
        assert len(builds) == 3
        workspace.set_limit(2500)  # keeps the two most recent
        assert workspace.cached_bytes() == 2000
        workspace.set_limit(0)
        with workspace.reuse("ring", 1000, "cpu", build):
            pass
        assert len(builds) == 4 and workspace.cached_bytes() == 0
    workspace.set_limit(10**6)
    with workspace.reuse("ring", 1000, "cpu", build):  # autograd on: never kept
        pass
    assert len(builds) == 5 and workspace.cached_bytes() == 0
    with pytest.raises(ValueError, match="limit"):
        workspace.set_limit(-1)


def _tanh_problem(seed=0, batch=8, dim=64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    w = 0.9 * w / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ w.T + x)), torch.zeros(batch, dim, dtype=torch.float64)


@pytest.mark.parametrize("solver", [anderson, broyden])
def test_pooled_solves_match_unpooled_and_never_alias_the_pool(solver):
    func, x0 = _tanh_problem()
    with torch.no_grad():
        first, states, _ = solver(func, x0, max_iter=30, tol=1e-10, indexing=[3])
        kept, kept_state = first.clone(), states[0].clone()
        other_func, other_x0 = _tanh_problem(seed=1)
        solver(other_func, other_x0, max_iter=30, tol=1e-10)  # reuses and overwrites the pool
        assert workspace.cached_bytes() > 0
        assert torch.equal(first, kept) and torch.equal(states[0], kept_state)
        workspace.set_limit(0)
        unpooled, _, _ = solver(func, x0, max_iter=30, tol=1e-10)
    assert torch.equal(first, unpooled)


def test_a_solve_nested_in_func_gets_its_own_history():
    inner_func, inner_x0 = _tanh_problem(seed=2, batch=8, dim=64)

    def outer(z):
        shift, _, _ = anderson(inner_func, inner_x0, max_iter=20, tol=1e-10)
        return 0.5 * torch.tanh(z) + 0.1 * shift

    with torch.no_grad():
        pooled, _, _ = anderson(outer, torch.zeros(8, 64, dtype=torch.float64), max_iter=40,
                                tol=1e-10)
        workspace.set_limit(0)
        plain, _, _ = anderson(outer, torch.zeros(8, 64, dtype=torch.float64), max_iter=40,
                               tol=1e-10)
    assert torch.equal(pooled, plain)


def test_func_returning_its_input_never_hands_out_an_iterate_buffer():
    # Anderson passes func its iterate buffers; an identity func would return one as the
    # best state, which the next solve would overwrite
    x0 = torch.randn(4, 64, dtype=torch.float64)
    calls = []

    def moves_once(z):  # x0 + 1 at the first call, then the identity: a mixed iterate
        calls.append(1)
        return z + 1 if len(calls) == 1 else z

    with torch.no_grad():
        z, states, _ = anderson(moves_once, x0, max_iter=5, tol=1e-12, indexing=[2])
        assert torch.equal(z, x0 + 1)
        kept = z.clone()
        func, other_x0 = _tanh_problem(seed=3, batch=4, dim=64)
        anderson(func, other_x0, max_iter=20, tol=1e-10)
    assert torch.equal(z, kept) and torch.equal(states[0], kept)


@pytest.mark.parametrize("solver", [anderson, broyden])
def test_state_kept_from_an_inference_mode_solve_serves_a_no_grad_solve(solver):
    func, x0 = _tanh_problem(seed=4)
    with torch.inference_mode():
        first, _, _ = solver(func, x0, max_iter=30, tol=1e-10)
    assert workspace.cached_bytes() > 0
    with torch.no_grad():  # writes through the views cut in inference mode
        second, _, _ = solver(func, x0, max_iter=30, tol=1e-10)
    assert torch.equal(first, second)
