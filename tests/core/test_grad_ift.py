"""Implicit differentiation (IFT): the DEQ gradient against the dense (I - J)^-1 solution.

System: z* = tanh(W z* + U x + b), float64, ||W||_2 = 0.8 (a contraction), so z* is
unique and dL/dtheta = dL/dz* (I - J)^-1 df/dtheta exactly.
"""
import warnings

import pytest
import torch

from core.deq import get_deq

TIGHT = dict(f_max_iter=300, f_tol=1e-13, b_max_iter=300, b_tol=1e-13)


def tanh_f(w, u, b, x):
    return lambda z: torch.tanh(z @ w.T + x @ u.T + b)


def solve_dense(w, u, b, x, iters=400):
    with torch.no_grad():
        z = torch.zeros_like(x)
        for _ in range(iters):
            z = tanh_f(w, u, b, x)(z)
    return z


def dense_ift_grad(params, v):
    """dL/dtheta = v (I - J)^-1 df/dtheta with the Jacobians written out densely per sample.

    With s = 1 - z*^2: J = diag(s) W, df/dW = diag(s) (. ⊗ z*), df/dU = diag(s) (. ⊗ x),
    df/db = diag(s), df/dx = diag(s) U.
    """
    w, u, b, x = (p.detach() for p in params)
    z_star = solve_dense(w, u, b, x)
    s = 1 - z_star**2
    eye = torch.eye(z_star.shape[1], dtype=torch.float64)
    adjoint = torch.stack([torch.linalg.solve((eye - s[i, :, None] * w).T, v[i]) for i in range(len(v))])
    a = adjoint * s
    return [a.T @ z_star, a.T @ x, a.sum(0), a @ u]


def deq_grad(params, v, **kw):
    w, u, b, x = params
    deq = get_deq(**kw)
    z_out, info = deq(tanh_f(w, u, b, x), torch.zeros_like(x))
    return torch.autograd.grad((z_out[-1] * v).sum(), params), z_out, info


@pytest.mark.parametrize("hook", [False, True])
def test_ift_matches_dense_inverse(hook, tanh_system):
    params = tanh_system(64)
    v = torch.randn(params[3].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = dense_ift_grad(params, v)
    grads, z_out, _ = deq_grad(params, v, ift=not hook, hook_ift=hook, **TIGHT)
    assert len(z_out) == 1
    for g, r in zip(grads, ref):
        assert (g - r).abs().max() < 1e-6 * max(1.0, r.abs().max())


def test_hook_ift_equals_function_ift_with_anderson(tanh_system):
    params = tanh_system(16)
    v = torch.randn(params[3].shape, dtype=torch.float64)
    kw = dict(TIGHT, f_solver="anderson", b_solver="anderson", f_max_iter=60, b_max_iter=60)
    fn, _, _ = deq_grad(params, v, ift=True, **kw)
    hk, _, _ = deq_grad(params, v, hook_ift=True, **kw)
    for a, b in zip(fn, hk):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_ift_gradcheck(tanh_system):
    """Fixed iteration counts (tol far below reach), so the forward is one smooth map."""
    params = tanh_system(8, batch=2)
    deq = get_deq(ift=True, f_max_iter=120, f_tol=1e-300, b_max_iter=120, b_tol=1e-300)

    def run(w, u, b, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # b_tol=1e-300 is never reached, by design
            return deq(tanh_f(w, u, b, x), torch.zeros_like(x))[0][-1]

    assert torch.autograd.gradcheck(run, tuple(params), fast_mode=True, atol=1e-6, rtol=1e-4)


def test_backward_writer_gets_stats_and_missed_tol_warns(tanh_system):
    params = tanh_system(16)
    stats = []
    deq = get_deq(ift=True, f_max_iter=100, f_tol=1e-10, b_max_iter=3, b_tol=1e-12)
    z_out, _ = deq(tanh_f(*params), torch.zeros_like(params[3]), backward_writer=stats.append)
    with pytest.warns(RuntimeWarning, match="b_tol"):
        z_out[-1].sum().backward()
    (info,) = stats
    assert info["nfe"] == 3
    assert info["abs_lowest"].shape == (3,)
    assert not info["b_converged"].any()
    assert (info["abs_lowest"] > 1e-12).all()

    stats.clear()
    deq = get_deq(ift=True, f_max_iter=100, f_tol=1e-10, b_max_iter=200, b_tol=1e-8)
    z_out, _ = deq(tanh_f(*params), torch.zeros_like(params[3]), backward_writer=stats.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z_out[-1].sum().backward()
    assert stats[0]["b_converged"].all() and (stats[0]["abs_lowest"] <= 1e-8).all()


def lstm_like(w, u, x):
    """A coupled two-tensor (h, c) map, contractive in (h, c)."""

    def f(h, c):
        c_new = 0.5 * torch.tanh(c @ w.T + x @ u.T) + 0.3 * torch.tanh(h)
        h_new = torch.tanh(h @ w.T) * 0.5 + 0.4 * torch.tanh(c_new)
        return h_new, c_new

    return f


@pytest.mark.parametrize("mode", ["ift", "hook_ift"])
def test_two_tensor_ift_matches_finite_differences(mode, tanh_system):
    w, u, _, x = tanh_system(12)
    z0 = [torch.zeros_like(x), torch.zeros_like(x)]
    probe = torch.randn(2, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss(w_, u_, x_, deq):
        h, c = deq(lstm_like(w_, u_, x_), z0)[0][-1]
        return (h * probe[0]).sum() + (c**2 * probe[1]).sum()

    deq = get_deq(**{mode: True}, **TIGHT)
    grads = torch.autograd.grad(loss(w, u, x, deq), (w, u, x))
    deq.eval()
    direction = [torch.randn_like(t) for t in (w, u, x)]
    eps = 1e-5
    with torch.no_grad():
        plus = loss(*[t + eps * d for t, d in zip((w, u, x), direction)], deq)
        minus = loss(*[t - eps * d for t, d in zip((w, u, x), direction)], deq)
    fd = (plus - minus) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    assert abs(float(analytic - fd)) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(ift=True), dict(hook_ift=True), dict(f_max_iter=0, grad=100)])
def test_gradients_on_cuda_equal_cpu(options, tanh_system):
    params = tanh_system(32)
    v = torch.randn(params[3].shape, dtype=torch.float64)
    kw = dict(TIGHT, **options)
    cpu, _, _ = deq_grad(params, v, **kw)
    cuda_params = [p.detach().to("cuda").requires_grad_() for p in params]
    gpu, z_out, info = deq_grad(cuda_params, v.to("cuda"), **kw)
    assert z_out[-1].device.type == "cuda" and info["abs_lowest"].device.type == "cuda"
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-10)
