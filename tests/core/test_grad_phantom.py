"""Phantom gradients and unrolled BPTT against the implicit gradient; mem_gc against plain autograd.

System: z* = tanh(W z* + U x + b), float64, ||W||_2 = 0.8. With tau = 1 the K-step
phantom gradient from z* is the truncated Neumann series v sum_{k<K} J^k df/dtheta, whose
error against IFT is v J^K (I - J)^-1 df/dtheta: it shrinks like 0.8^K.
"""
import pytest
import torch
from torch import nn

from core.deq import get_deq
from core.grad import phantom_grad
from core.utils.mem_gc import mem_gc


def tanh_system(dim=32, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    w = 0.8 * w / torch.linalg.matrix_norm(w, 2)
    u = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    b = 0.1 * torch.randn(dim, generator=gen, dtype=torch.float64)
    x = 0.1 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (w, u, b, x)]


def tanh_f(w, u, b, x):
    return lambda z: torch.tanh(z @ w.T + x @ u.T + b)


def flat_grad(params, v, **kw):
    w, u, b, x = params
    z_out, _ = get_deq(**kw)(tanh_f(w, u, b, x), torch.zeros_like(x))
    grads = torch.autograd.grad((z_out[-1] * v).sum(), params)
    return torch.cat([g.flatten() for g in grads])


@pytest.fixture(scope="module")
def system():
    params = tanh_system()
    v = torch.randn(params[3].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ift = flat_grad(params, v, ift=True, f_max_iter=100, f_tol=1e-13, b_max_iter=100, b_tol=1e-13)
    return params, v, ift


def test_phantom_error_falls_like_a_truncated_series(system):
    params, v, ift = system
    errors = []
    for steps in (1, 5, 20):
        pg = flat_grad(params, v, grad=steps, tau=1.0, f_max_iter=100, f_tol=1e-13)
        errors.append(float((pg - ift).norm() / ift.norm()))
        assert errors[-1] < 2 * 0.8**steps
    assert errors[0] > errors[1] > errors[2]


def test_unrolled_bptt_equals_ift(system):
    params, v, ift = system
    bptt = flat_grad(params, v, f_max_iter=0, grad=200, tau=1.0)
    assert (bptt - ift).abs().max() < 1e-8


def test_damped_phantom_converges_to_ift(system):
    """tau (J - I) + I has the same fixed point, so many damped steps also give IFT."""
    params, v, ift = system
    damped = flat_grad(params, v, grad=120, tau=0.6, f_max_iter=100, f_tol=1e-13)
    assert float((damped - ift).norm() / ift.norm()) < 1e-8
    few = flat_grad(params, v, grad=3, tau=0.6, f_max_iter=100, f_tol=1e-13)
    assert float((few - ift).norm() / ift.norm()) > 1e-3


def test_sup_gap_and_sup_loc_select_states():
    calls = []

    def f(z):
        calls.append(1)
        return 0.5 * z + 1.0

    z0 = torch.zeros(2, 3)
    gap = phantom_grad(f, z0, steps=6, sup_gap=2)
    assert [float(z[0, 0]) for z in gap] == [1.5, 1.875, 1.96875]
    loc = phantom_grad(f, z0, steps=4, sup_loc=[1, 3])
    assert [float(z[0, 0]) for z in loc] == [1.0, 1.75, 1.875]
    assert len(calls) == 10


def test_tuple_state_phantom_equals_unrolled_by_hand():
    w, u, _, x = tanh_system(dim=6, batch=2)

    def f(h, c):
        return torch.tanh(h @ w.T + c), 0.5 * torch.tanh(x @ u.T + h)

    z_out, _ = get_deq(f_max_iter=0, grad=4, tau=0.5)(f, [torch.zeros_like(x), torch.zeros_like(x)])
    h, c = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(4):
        fh, fc = f(h, c)
        h, c = 0.5 * fh + 0.5 * h, 0.5 * fc + 0.5 * c
    got = torch.autograd.grad(z_out[-1][0].sum() + z_out[-1][1].sum(), (w, u))
    ref = torch.autograd.grad(h.sum() + c.sum(), (w, u))
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-14)


class Cell(nn.Module):
    def __init__(self, dim=8, dropout=0.0):
        super().__init__()
        self.lin = nn.Linear(dim, dim).double()
        self.drop = nn.Dropout(dropout)

    def forward(self, z, x):
        return self.drop(torch.tanh(self.lin(z) + x))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_mem_gc_unrolled_gradients_equal_plain(dropout):
    torch.manual_seed(0)
    cell = Cell(dropout=dropout)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def grads(use_gc):
        torch.manual_seed(7)
        f = (lambda z: mem_gc(cell, (z, x))) if use_gc else (lambda z: cell(z, x))
        z_out, _ = get_deq(f_max_iter=0, grad=10)(f, torch.zeros_like(x))
        return torch.autograd.grad((z_out[-1] ** 2).sum(), [x, *cell.parameters()])

    for a, b in zip(grads(True), grads(False)):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_mem_gc_keeps_only_inputs():
    """A checkpointed step saves its input state, not f's intermediate activations."""
    cell = Cell(dim=64)
    x = torch.randn(16, 64, dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for use_gc in (True, False):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = torch.zeros_like(x)
            for _ in range(5):
                z = mem_gc(cell, (z, x)) if use_gc else cell(z, x)
        if use_gc:
            gc_saved = sum(saved)
    plain_saved = sum(saved)
    assert gc_saved == 5 * 2 * x.numel()  # (z, x) per step
    assert plain_saved > gc_saved


def test_mem_gc_through_weight_norm():
    """f reads a weight recomputed once per forward (reset_norm): gradients still reach g and v."""
    from core.norm import apply_norm, reset_norm

    torch.manual_seed(0)
    cell = Cell()
    apply_norm(cell)
    x = torch.randn(4, 8, dtype=torch.float64)

    def grads(use_gc):
        reset_norm(cell)
        f = (lambda z: mem_gc(cell, (z, x))) if use_gc else (lambda z: cell(z, x))
        z_out, _ = get_deq(f_max_iter=0, grad=6)(f, torch.zeros_like(x))
        return torch.autograd.grad(z_out[-1].square().sum(), list(cell.parameters()))

    names = [n for n, _ in cell.named_parameters()]
    assert "lin.weight_v" in names and "lin.weight_g" in names
    for a, b in zip(grads(True), grads(False)):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)
