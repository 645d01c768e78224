"""Bad solver inputs fail early with a message that says what to change."""
import pytest
import torch

from core.solvers import anderson, broyden, fixed_point_iter, get_solver, register_solver
from core.solvers.registry import solver_options

SOLVERS = ["fixed_point_iter", "simple_fixed_point_iter", "anderson", "broyden"]
X0 = torch.zeros(2, 3)


@pytest.mark.parametrize("name", SOLVERS)
def test_unknown_keyword_names_closest_option(name):
    with pytest.raises(TypeError, match=r"'stop_mod'.*did you mean 'stop_mode'"):
        get_solver(name)(torch.tanh, X0, max_iter=3, stop_mod="rel")
    with pytest.raises(TypeError, match=r"'lamda'.*did you mean 'lam'"):
        get_solver(name)(torch.tanh, X0, max_iter=3, lamda=1e-3)


def test_option_of_another_solver_is_ignored():
    z, _, info = fixed_point_iter(torch.tanh, X0 + 1, max_iter=200, tol=1e-3, m=5, lam=1e-2)
    assert info["abs_lowest"].max() < 1e-3 and info["nfe"] > 5
    z, _, info = broyden(lambda z: 0.5 * z, X0 + 1, max_iter=50, tau=0.5)
    assert info["abs_lowest"].max() < 1e-3


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(tol=0), "tol must be a number > 0"),
    (dict(tol=-1e-3), "tol must be a number > 0"),
    (dict(max_iter=-1), "max_iter must be an int >= 0"),
    (dict(stop_mode="max"), "stop_mode must be 'abs' or 'rel'"),
    (dict(indexing=[1, -2]), "indexing must be None or a list"),
    (dict(sync_free=True, batch_independent=True), "set one of them to False"),
])
def test_bad_common_values(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_solver(name)(torch.tanh, X0, **kwargs)


def test_bad_solver_specific_values():
    with pytest.raises(ValueError, match="m .history size. must be an int >= 1"):
        anderson(torch.tanh, X0, m=0)
    with pytest.raises(ValueError, match="lam .regularisation. must be a number >= 0"):
        anderson(torch.tanh, X0, lam=-1.0)
    with pytest.raises(ValueError, match="m .number of stored pairs. must be an int >= 1"):
        broyden(torch.tanh, X0, m=0)
    with pytest.raises(ValueError, match="tau .damping. must be a number > 0"):
        fixed_point_iter(torch.tanh, X0, tau=0.0)


@pytest.mark.parametrize("name", SOLVERS)
def test_func_changing_shape_or_dtype_is_rejected(name):
    solver = get_solver(name)
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\).*expected \(2, 3\)"):
        solver(lambda z: torch.zeros(2, 4), X0, max_iter=3)
    with pytest.raises(ValueError, match="same shape and dtype"):
        solver(lambda z: z.double(), X0, max_iter=3)
    with pytest.raises(ValueError, match="same structure"):
        solver(lambda zs: zs[0], (X0, X0), max_iter=3)


def test_unknown_solver_name():
    with pytest.raises(ValueError, match="did you mean 'anderson'"):
        get_solver("andersen")


def test_register_solver_makes_its_options_known(monkeypatch):
    from core.solvers import registry

    # register into copies so the test solver does not outlive this test
    monkeypatch.setattr(registry, "_SOLVERS", dict(registry._SOLVERS))
    monkeypatch.setattr(registry, "_OPTIONS", dict(registry._OPTIONS))
    def halving(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None,
                return_final=False, shrink=0.5, **kwargs):
        return fixed_point_iter(func, x0, max_iter=max_iter, tol=tol, tau=shrink)

    register_solver("halving_test_solver", halving)
    assert get_solver("halving_test_solver") is halving
    assert "shrink" in solver_options("halving_test_solver")
    # another solver now ignores `shrink` instead of rejecting it
    _, _, info = anderson(torch.tanh, X0 + 1, max_iter=30, shrink=0.3)
    assert info["abs_lowest"].max() < 1e-3


@pytest.mark.parametrize("sync_free", [False, True])
def test_in_place_solvers_reject_a_differentiable_func_with_a_clear_error(sync_free):
    weight = torch.nn.Parameter(torch.full((4, 4), 0.1))
    func = lambda z: torch.tanh(z @ weight.T + 1)  # noqa: E731
    for solver in (anderson, broyden):
        with pytest.raises(RuntimeError, match="torch.no_grad"):
            solver(func, torch.zeros(2, 4), max_iter=5, sync_free=sync_free)
        with torch.no_grad():
            z, _, _ = solver(func, torch.zeros(2, 4), max_iter=30, tol=1e-6, sync_free=sync_free)
        assert torch.allclose(z, func(z).detach(), atol=1e-5)
    z, _, _ = fixed_point_iter(func, torch.zeros(2, 4), max_iter=30, tol=1e-6)
    z.sum().backward()  # fixed-point iteration stays differentiable
    assert weight.grad.abs().sum() > 0
