"""The solvers' scratch pool (`core.solvers.workspace`): reuse, isolation, limits."""
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


def test_a_returned_buffer_is_lent_again_for_a_smaller_request():
    with torch.no_grad():
        with workspace.lend((4, 100), torch.float32, "cpu") as first:
            address = first.data_ptr()
        assert workspace.cached_bytes() == 4 * 100 * 4
        with workspace.lend((3, 50), torch.float32, "cpu") as second:
            assert second.data_ptr() == address and second.shape == (3, 50)
        with workspace.lend((3, 50), torch.float64, "cpu") as other_dtype:
            assert other_dtype.data_ptr() != address


def test_nested_lends_get_separate_buffers():
    with torch.no_grad():
        with workspace.lend((64,), torch.float32, "cpu") as outer:
            with workspace.lend((64,), torch.float32, "cpu") as inner:
                assert inner.data_ptr() != outer.data_ptr()


def test_no_pooling_with_autograd_on_or_over_the_limit():
    with torch.no_grad():
        with workspace.lend((64,), torch.float32, "cpu"):
            pass
    with workspace.lend((64,), torch.float32, "cpu") as with_grad_mode:
        assert with_grad_mode.data_ptr() not in [t.data_ptr() for t in workspace._free()]
    assert workspace.cached_bytes() == 64 * 4  # the autograd-mode tensor was not kept
    workspace.set_limit(0)
    assert workspace.cached_bytes() == 0
    with torch.no_grad(), workspace.lend((64,), torch.float32, "cpu"):
        pass
    assert workspace.cached_bytes() == 0
    with pytest.raises(ValueError, match="limit"):
        workspace.set_limit(-1)


def test_a_buffer_lent_in_inference_mode_is_writable_later_under_no_grad():
    with torch.inference_mode():
        with workspace.lend((8,), torch.float32, "cpu") as buf:
            buf.fill_(1.0)
    with torch.no_grad(), workspace.lend((8,), torch.float32, "cpu") as again:
        again.fill_(2.0)  # an inference tensor would raise here
        assert not again.is_inference()


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
