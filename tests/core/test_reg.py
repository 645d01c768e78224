"""Regularisers: Hutchinson Jacobian loss (value and gradient, also through a DEQ output),
the JR training helper, the power method against a dense spectrum, fixed-point correction."""
import random

import pytest
import torch

from core.reg import fp_correction, jac_loss, jac_loss_weight, jac_reg, power_method, register_weight_func

D = 6


def _linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    x = torch.randn(512, D, generator=g, dtype=torch.float64)
    return A, x


def test_jac_reg_of_linear_f_matches_frobenius_norm_and_its_gradient():
    torch.manual_seed(0)
    A, x = _linear_problem()
    z0 = x.clone().requires_grad_()
    f0 = z0 @ A.T + 1.0
    # Batch 512 x 64 probes: each term is ||A^T v||^2 / d, whose relative std is about
    # sqrt(2 ||A A^T||_F^2) / ||A||_F^2, here below 1, so 32768 samples give ~0.5% error.
    estimate = jac_reg(f0, z0, vecs=64)
    exact = A.detach().square().sum() / D
    assert abs(estimate.item() - exact.item()) < 0.03 * exact.item()
    (grad,) = torch.autograd.grad(estimate, A)
    assert torch.allclose(grad, 2 * A.detach() / D, atol=0.05 * (2 * A.detach() / D).abs().max().item())


def test_jac_reg_gradient_reaches_f_through_a_deq_output():
    from core.deq import get_deq

    torch.manual_seed(1)
    A, x = _linear_problem(1)
    deq = get_deq(f_max_iter=60, f_tol=1e-10, grad=2)

    def f(z):
        return z @ A.T + x

    z_out, _ = deq(f, torch.zeros_like(x))
    z_star = z_out[-1]
    assert z_star.requires_grad
    estimate = jac_reg(f(z_star), z_star, vecs=64)
    (grad,) = torch.autograd.grad(estimate, A)
    assert abs(estimate.item() - A.detach().square().sum().item() / D) < 0.03 * A.detach().square().sum().item() / D
    assert torch.allclose(grad, 2 * A.detach() / D, atol=0.05 * (2 * A.detach() / D).abs().max().item())


def test_jac_reg_rejects_an_input_without_grad():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires_grad"):
        jac_reg(z * 2, z)


def test_jac_loss_helper_weight_frequency_and_incremental():
    A, x = _linear_problem(2)
    z_star = torch.zeros_like(x)  # detached, e.g. an eval output: the helper re-attaches it
    args = {"jac_loss_weight": 0.5, "jac_loss_freq": 1.0, "jac_incremental": 0}
    torch.manual_seed(0)
    loss = jac_loss(args, lambda z: z @ A.T + x, z_star, step=7, vecs=32)
    exact = A.detach().square().sum().item() / D
    assert abs(loss.item() - 0.5 * exact) < 0.03 * 0.5 * exact
    (grad,) = torch.autograd.grad(loss, A)
    assert grad.abs().sum() > 0
    # locuslab/deq: +0.1 after every jac_incremental steps, only with weight and freq > 0.
    inc = dict(args, jac_incremental=100)
    assert [jac_loss_weight(inc, s) for s in (0, 99, 100, 250)] == pytest.approx([0.5, 0.5, 0.6, 0.7])
    assert jac_loss_weight(dict(inc, jac_loss_freq=0.0), 250) == 0.5
    # Frequency: the share of regularised steps follows jac_loss_freq.
    rng = random.Random(0)
    hits = sum(bool(jac_loss(dict(args, jac_loss_freq=0.3), lambda z: 2 * z, torch.ones(2, 2), rng=rng) != 0)
               for _ in range(1000))
    assert abs(hits / 1000 - 0.3) < 0.05
    assert jac_loss(dict(args, jac_loss_weight=0.0), lambda z: 2 * z, torch.ones(2, 2)).item() == 0.0


def test_jac_loss_tuple_state():
    torch.manual_seed(0)
    a, b = torch.zeros(256, 3), torch.zeros(256, 2)
    args = {"jac_loss_weight": 1.0, "jac_loss_freq": 1.0}
    # f(z1, z2) = (2 z1, 3 z2): ||J||_F^2 / d = (3 * 4 + 2 * 9) / 5 = 6.
    loss = jac_loss(args, lambda z1, z2: (2 * z1, 3 * z2), (a, b), vecs=64)
    assert abs(loss.item() - 6.0) < 0.2


def test_power_method_matches_dense_spectral_radius():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mats = []
    for sign in (1.0, -1.0, 1.0):
        q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
        eig = torch.rand(50, generator=g, dtype=torch.float64) * 1.6 - 0.8
        eig[0] = sign * 1.1  # dominant in modulus, negative for the second sample
        mats.append(q @ torch.diag(eig) @ q.T)
    sym = (torch.randn(50, 50, generator=g, dtype=torch.float64))
    mats.append((sym + sym.T) / 2 / 10)  # a plain random symmetric matrix too
    A = torch.stack(mats)
    z0 = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    f0 = torch.einsum("bij,bj->bi", A, z0)  # per-sample Jacobian A[b]
    dense = torch.linalg.eigvalsh(A).abs().amax(dim=1)
    vec, radius = power_method(f0, z0, n_iters=1000, tol=1e-10)
    assert torch.allclose(radius, dense, atol=1e-3)
    vec, radius = power_method(f0, z0)  # TorchDEQ's default: 100 iterations
    assert torch.allclose(radius[:3], dense[:3], atol=1e-3)
    assert vec.shape == z0.shape


def test_fp_correction_weights_and_values():
    preds = [torch.tensor(float(i), requires_grad=True) for i in range(4)]
    target = torch.tensor(0.0)
    crit = lambda p, t: (p - t) ** 2  # noqa: E731
    losses = [0.0, 1.0, 4.0, 9.0]
    exp = fp_correction(crit, (preds, target), gamma=0.5)
    assert exp.item() == pytest.approx(sum(0.5 ** (3 - i) * v for i, v in enumerate(losses)))
    lin = fp_correction(crit, (preds, target), weight_func="linear")
    assert lin.item() == pytest.approx(sum((1 - (3 - i) / 4 * 0.9) * v for i, v in enumerate(losses)))
    const, values = fp_correction(crit, (preds, target), weight_func="const", c=2.0, return_loss_values=True)
    assert const.item() == pytest.approx(28.0) and values == losses
    exp.backward()
    assert preds[3].grad.item() == pytest.approx(2 * 3.0)
    register_weight_func("last_only", lambda n, k: float(k == n - 1))
    assert fp_correction(crit, (preds, [target] * 4), weight_func="last_only").item() == 9.0
    with pytest.raises(ValueError, match="exp"):
        fp_correction(crit, (preds, target), weight_func="cubic")


def test_jac_reg_gradient_through_an_ift_deq_output_matches_finite_differences():
    """Nonlinear f: the gradient includes the path through z*(W), solved by IFT."""
    from core.deq import get_deq

    torch.manual_seed(0)
    W = (torch.randn(5, 5, dtype=torch.float64) * 0.4).requires_grad_()
    x = torch.randn(3, 5, dtype=torch.float64)
    deq = get_deq(f_solver="anderson", b_solver="anderson", ift=True, f_max_iter=100, b_max_iter=100,
                  f_tol=1e-13, b_tol=1e-13)

    def loss(weight):
        f = lambda z: torch.tanh(z @ weight.T + x)  # noqa: E731
        z_star = deq(f, torch.zeros_like(x))[0][-1]
        torch.manual_seed(123)  # the same probes at every evaluation
        return jac_reg(f(z_star), z_star, vecs=3)

    (grad,) = torch.autograd.grad(loss(W), W)
    eps = 1e-6
    for i, j in [(0, 0), (1, 3), (4, 2), (2, 4)]:
        step = torch.zeros_like(W)
        step[i, j] = eps
        fd = (loss(W.detach() + step).item() - loss(W.detach() - step).item()) / (2 * eps)
        assert abs(grad[i, j].item() - fd) < 1e-8


def _with_eigenvalues(blocks, rest, gen):
    """A random real matrix similar to block-diag(blocks, diag(rest)) (a non-normal basis)."""
    dense = torch.block_diag(*blocks, torch.diag(rest))
    basis = torch.randn(dense.shape[0], dense.shape[0], generator=gen, dtype=torch.float64)
    basis = basis + 3 * torch.eye(dense.shape[0], dtype=torch.float64)  # well conditioned
    return basis @ dense @ torch.linalg.inv(basis)


def test_power_method_finds_a_complex_or_negative_dominant_pair_at_its_default_budget():
    # Power iteration on v alone oscillates between the two dominant directions here
    # (TorchDEQ's estimate of the first sample came out at 0.35-0.9 depending on v).
    gen = torch.Generator().manual_seed(1)
    rest = torch.rand(28, generator=gen, dtype=torch.float64) * 1.2 - 0.6
    angle = torch.tensor(2.0, dtype=torch.float64)
    rotation = 0.9 * torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                                  torch.stack([angle.sin(), angle.cos()])])
    mats = [_with_eigenvalues([rotation], rest, gen),  # 0.9 e^{+-2i}
            _with_eigenvalues([torch.diag(torch.tensor([-0.8, 0.8], dtype=torch.float64))], rest, gen),
            _with_eigenvalues([torch.diag(torch.tensor([-0.95, 0.3], dtype=torch.float64))], rest, gen)]
    A = torch.stack(mats)
    dense = torch.linalg.eigvals(A).abs().max(dim=1).values
    assert torch.allclose(dense, torch.tensor([0.9, 0.8, 0.95], dtype=torch.float64))
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        z0 = torch.randn(3, 30, dtype=dtype, requires_grad=True)
        f0 = torch.einsum("bij,bj->bi", A.to(dtype), z0)
        vec, radius = power_method(f0, z0)
        assert (radius.double() - dense).abs().max() < 1e-2, (dtype, radius)
        assert vec.shape == z0.shape and radius.dtype == dtype
        # the vector lies in a dominant invariant plane of J^T = A^T (the products are VJPs):
        # v, A^T v and A^T A^T v are linearly dependent
        v, At = vec.detach().double(), A.transpose(1, 2)
        krylov = torch.stack([v, torch.einsum("bij,bj->bi", At, v),
                              torch.einsum("bij,bj->bi", At, torch.einsum("bij,bj->bi", At, v))], 2)
        s = torch.linalg.svdvals(krylov)
        assert (s[:, 2] / s[:, 0]).max() < 1e-2


def test_power_method_of_a_tuple_state_and_budget_smaller_than_a_cycle():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(2, 7, 7, generator=gen, dtype=torch.float64) / 3
    dense = torch.linalg.eigvals(A).abs().max(dim=1).values
    z0 = torch.randn(2, 7, dtype=torch.float64)
    za, zb = z0[:, :3].clone().requires_grad_(), z0[:, 3:].clone().requires_grad_()
    f = torch.einsum("bij,bj->bi", A, torch.cat([za, zb], 1))
    vec, radius = power_method((f[:, :3], f[:, 3:]), (za, zb))
    assert [t.shape for t in vec] == [za.shape, zb.shape]
    assert torch.allclose(radius, dense, atol=1e-6)  # 7 x 7: the Krylov space is all of R^7
    _, rough = power_method((f[:, :3], f[:, 3:]), (za, zb), n_iters=3)
    assert rough.shape == (2,) and torch.isfinite(rough).all()
