"""The DEQ module's graphs: sampled states, whole-solve info, budgets, eval-mode gradients, options."""
import argparse

import pytest
import torch

from core.deq import DEQIndexing, DEQSliced, get_deq, register_deq


class Counted:
    """f(z) = tanh(W z + U x + b) that counts its calls."""

    def __init__(self, params):
        self.w, self.u, self.b, self.x = params
        self.calls = 0

    def __call__(self, z):
        self.calls += 1
        return torch.tanh(z @ self.w.T + self.x @ self.u.T + self.b)


def dense_ift(params, v):
    """v (I - J)^-1 df/dtheta, Jacobians written out per sample (see test_grad_ift)."""
    w, u, b, x = (p.detach() for p in params)
    z = torch.zeros_like(x)
    for _ in range(300):
        z = torch.tanh(z @ w.T + x @ u.T + b)
    s = 1 - z**2
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    adj = torch.stack([torch.linalg.solve((eye - s[i, :, None] * w).T, v[i]) for i in range(len(v))])
    a = adj * s
    return torch.cat([(a.T @ z).flatten(), (a.T @ x).flatten(), a.sum(0), (a @ u).flatten()])


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


TIGHT = dict(f_tol=1e-13, b_max_iter=100, b_tol=1e-13)


@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_n_states_and_indexing_return_sampled_states_with_gradients(core, tanh_system):
    params = tanh_system()
    for options, n in ((dict(n_states=3, f_max_iter=30), 3), (dict(indexing=[2, 5], f_max_iter=30), 3)):
        f = Counted(params)
        z_out, _ = get_deq(core=core, f_tol=1e-300, **options)(f, torch.zeros_like(params[3]))
        assert len(z_out) == n
        for z in z_out:
            assert z.requires_grad
            g = torch.autograd.grad(z.sum(), params[0], retain_graph=True)[0]
            assert g.abs().sum() > 0
        # Later states are closer to the fixed point.
        res = [float((f(z) - z).detach().norm()) for z in z_out]
        assert res[0] > res[-1]


@pytest.mark.parametrize("core", ["sliced", "indexing"])
@pytest.mark.parametrize("options", [dict(n_states=3), dict(indexing=[2, 5]), dict(indexing=[2, 150])])
def test_last_state_carries_ift_gradient(core, options, tanh_system):
    """indexing=[2, 150] with f_max_iter=200: the solve converges (~40 steps) before step 150."""
    params = tanh_system()
    v = torch.randn(params[3].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = dense_ift(params, v)
    f = Counted(params)
    deq = get_deq(core=core, ift=True, f_max_iter=200, **TIGHT, **options)
    z_out, info = deq(f, torch.zeros_like(params[3]))
    assert len(z_out) == 3
    if core == "indexing":
        assert info["nfe"] < 150  # converged before the last index
    got = flat(torch.autograd.grad((z_out[-1] * v).sum(), params, retain_graph=True))
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    # The earlier states carry a 1-step phantom gradient: a different, nonzero one.
    first = flat(torch.autograd.grad((z_out[0] * v).sum(), params))
    assert first.abs().sum() > 0 and (first - ref).abs().max() > 1e-6


def test_sliced_info_covers_the_whole_solve(tanh_system):
    params = tanh_system()
    f = Counted(params)
    deq = get_deq(n_states=3, f_max_iter=30, f_tol=1e-300, grad=2)
    z_out, info = deq(f, torch.zeros_like(params[3]))
    assert f.calls == 30 + 3 * 2
    assert info["nfe"] == 30
    assert info["abs_trace"].shape == (3, 3 * (10 + 1))
    # Lowest over the whole solve, and the step of the whole solve where it was reached
    # (column c of the concatenated traces is step 10 * (c // 11) + c % 11).
    assert torch.equal(info["abs_lowest"], info["abs_trace"].amin(dim=1))
    first_min = info["abs_trace"].argmin(dim=1)
    assert torch.equal(info["nstep"].long(), 10 * (first_min // 11) + first_min % 11)
    assert (info["nstep"] > 10).all()
    # A 3-slice solve reaches about what one 30-step solve reaches.
    one_solve = get_deq(f_max_iter=30, f_tol=1e-300).eval()
    with torch.no_grad():
        _, whole = one_solve(Counted(params), torch.zeros_like(params[3]))
    assert (info["abs_lowest"] < 1e-6).all() and (whole["abs_lowest"] < 1e-6).all()


def test_train_and_eval_budgets(tanh_system):
    params = tanh_system()
    deq = get_deq(f_max_iter=7, eval_f_max_iter=13, f_tol=1e-300)
    f = Counted(params)
    _, info = deq(f, torch.zeros_like(params[3]))
    assert (info["nfe"], info["abs_trace"].shape[1], f.calls) == (7, 8, 8)
    deq.eval()
    f = Counted(params)
    with torch.no_grad():
        z_out, info = deq(f, torch.zeros_like(params[3]))
    assert (info["nfe"], f.calls, len(z_out)) == (13, 13, 1)
    assert not z_out[0].requires_grad
    # eval_factor when eval_f_max_iter is 0; a per-call budget overrides both.
    deq = get_deq(f_max_iter=10, eval_factor=1.5, f_tol=1e-300).eval()
    with torch.no_grad():
        assert deq(Counted(params), torch.zeros_like(params[3]))[1]["nfe"] == 15
        assert deq(Counted(params), torch.zeros_like(params[3]), solver_kwargs={"f_max_iter": 4})[1]["nfe"] == 4
    deq.train()
    f = Counted(params)
    _, info = deq(f, torch.zeros_like(params[3]), solver_kwargs={"f_max_iter": 5, "tol": 1e-300})
    assert info["nfe"] == 5 and f.calls == 6


@pytest.mark.parametrize("backward", [dict(ift=True), dict(grad=60)])
def test_eval_mode_output_is_differentiable_under_grad_mode(backward, tanh_system):
    params = tanh_system()
    v = torch.randn(params[3].shape, dtype=torch.float64)
    ref = dense_ift(params, v)
    deq = get_deq(f_max_iter=100, **TIGHT, **backward).eval()
    z_out, _ = deq(Counted(params), torch.zeros_like(params[3]))
    assert len(z_out) == 1 and z_out[0].requires_grad
    got = flat(torch.autograd.grad((z_out[0] * v).sum(), params))
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    # Nothing in f requires grad: nothing attached, z* itself.
    plain = [p.detach() for p in params]
    z_out, _ = deq(Counted(plain), torch.zeros_like(plain[3]))
    assert not z_out[0].requires_grad
    assert torch.allclose(z_out[0], torch.tanh(z_out[0] @ plain[0].T + plain[3] @ plain[1].T + plain[2]),
                          atol=1e-12)


def test_unrolled_training_output_requires_grad_and_info(tanh_system):
    params = tanh_system()
    f = Counted(params)
    z_out, info = get_deq(f_max_iter=0, grad=4, sup_gap=1)(f, torch.zeros_like(params[3]))
    assert len(z_out) == 4 and z_out[-1].requires_grad and f.calls == 4
    # info: the residual of the last unrolled step, ||z_4 - z_3||, at no extra call of f.
    assert info["nfe"] == 0 and info["abs_lowest"].shape == (3,)
    assert torch.allclose(info["abs_lowest"], (z_out[-1] - z_out[-2]).detach().norm(dim=1))


def test_sradius_of_the_jacobian(tanh_system):
    params = tanh_system(dim=8)
    deq = get_deq(f_max_iter=100, f_tol=1e-12).eval()
    with torch.no_grad():
        z_out, info = deq(Counted(params), torch.zeros_like(params[3]), sradius_mode=True)
    w = params[0].detach()
    s = 1 - z_out[0] ** 2
    exact = torch.stack([torch.linalg.eigvals(s[i, :, None] * w).abs().max() for i in range(3)])
    assert info["sradius"].shape == (3,)
    assert torch.allclose(info["sradius"], exact.to(info["sradius"].dtype), rtol=0.05)


def test_options_are_checked_at_construction():
    with pytest.raises(ValueError, match="fixed_point_iter"):
        get_deq(f_solver="fixed_point")
    with pytest.raises(ValueError, match="f_stop_mode"):
        get_deq(argparse.Namespace(stop_mode="rel", lr=0.1))
    with pytest.raises(TypeError, match="f_max_iter"):
        get_deq(f_max_iters=3)
    deq = get_deq(argparse.Namespace(core="indexing", f_max_iter=12, lr=0.1, n_states=3))
    assert isinstance(deq, DEQIndexing) and deq.indexing == [4, 8, 12]
    assert isinstance(get_deq({"indexing": [5, 10], "f_max_iter": 30}), DEQSliced)
    assert get_deq({"indexing": [5, 10], "f_max_iter": 30}).indexing == [5, 5, 20]
    with pytest.raises(ValueError, match="align"):
        get_deq(n_states=3, grad=[1, 2])


def test_register_deq_adds_a_core(tanh_system):
    class Doubled(DEQSliced):
        """Sliced, but every call runs twice the budget."""

        def _compute_f_iter(self, f_max_iter):
            return super()._compute_f_iter(2 * f_max_iter)

    register_deq("doubled", Doubled)
    params = tanh_system()
    deq = get_deq(core="doubled", f_max_iter=5, f_tol=1e-300)
    assert isinstance(deq, Doubled)
    assert deq(Counted(params), torch.zeros_like(params[3]))[1]["nfe"] == 10


@pytest.mark.parametrize("core", ["sliced", "indexing"])
@pytest.mark.parametrize("backward", [dict(ift=True), dict(hook_ift=True), dict(grad=[2, 80])])
def test_tuple_states_in_every_graph(core, backward, tanh_system):
    """(h, c) states: two sampled states each, the last with the converged gradient."""
    w, u, b, x = tanh_system(dim=8)

    def f(h, c):
        return torch.tanh(h @ w.T + c), 0.5 * torch.tanh(x @ u.T + b + 0.5 * h)

    def loss(z):
        return (z[0] ** 2).sum() + z[1].sum()

    deq = get_deq(core=core, n_states=2, f_max_iter=60, f_tol=1e-12, b_max_iter=100, b_tol=1e-10, **backward)
    z_out, info = deq(f, [torch.zeros_like(x), torch.zeros_like(x)])
    assert len(z_out) == 2 and all(isinstance(z, list) and len(z) == 2 for z in z_out)
    assert info["abs_lowest"].shape == (3,)
    got = torch.autograd.grad(loss(z_out[-1]), (w, u, x))
    reference = get_deq(f_max_iter=0, grad=150)  # unrolled from 0: converges to the IFT gradient
    ref = torch.autograd.grad(loss(reference(f, [torch.zeros_like(x), torch.zeros_like(x)])[0][-1]), (w, u, x))
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-9)


def test_reset_deq_recomputes_norms_and_redraws_dropout_masks():
    from torch import nn

    from core.deq import reset_deq
    from core.norm import apply_norm
    from core.utils.dropout import VariationalDropout

    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(4, 4), VariationalDropout(0.5))
    apply_norm(cell)
    cell(torch.randn(3, 4))
    assert cell[1].mask is not None
    with torch.no_grad():
        cell[0].weight_v.mul_(-1.0)  # flips the effective weight once it is recomputed
    before = cell[0].weight.detach().clone()
    reset_deq(cell)
    assert cell[1].mask is None
    assert torch.allclose(cell[0].weight, -before)
