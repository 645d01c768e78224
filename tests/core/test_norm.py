"""DEQ weight / spectral norm: the formulas, clipping, removal, filters, one compute per forward."""
import argparse

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from core.config import add_deq_args
from core.norm import SpectralNorm, WeightNorm, apply_norm, register_norm_module, remove_norm, reset_norm


def _sigma(matrix):
    return torch.linalg.matrix_norm(matrix.double(), ord=2).item()


def _rows(weight, dim):
    """The weight as (output rows, rest)."""
    return weight.movedim(dim, 0).reshape(weight.shape[dim], -1)


LAYERS = [
    (lambda: nn.Linear(12, 7), 0, (3, 12)),
    (lambda: nn.Conv2d(3, 5, 3), 0, (2, 3, 6, 6)),
    (lambda: nn.ConvTranspose2d(4, 6, 3), 1, (2, 4, 5, 5)),
    (lambda: nn.Conv1d(2, 3, 3), 0, (2, 2, 9)),
]


@pytest.mark.parametrize("make,dim,shape", LAYERS)
def test_weight_norm_starts_at_w_and_follows_the_formula(make, dim, shape):
    torch.manual_seed(0)
    layer = make()
    w0 = layer.weight.detach().clone()
    x = torch.randn(*shape)
    out0 = layer(x).detach()
    apply_norm(layer, "weight_norm")
    assert torch.allclose(layer(x), out0, atol=1e-6)  # g starts at ||W_i||: W_eff = W
    with torch.no_grad():
        layer.weight_g.mul_(torch.rand_like(layer.weight_g) + 0.5)
    reset_norm(layer)
    g = _rows(layer.weight_g, dim).reshape(-1, 1)
    expected = g * _rows(w0, dim) / _rows(w0, dim).norm(dim=1, keepdim=True)
    assert torch.allclose(_rows(layer.weight, dim), expected, atol=1e-6)


def test_weight_norm_no_scale_and_clip():
    torch.manual_seed(0)
    layer = nn.Linear(10, 6)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-2, 1, 6).unsqueeze(1))  # rows of very different norms
    w = layer.weight.detach().clone()
    norms = w.norm(dim=1, keepdim=True)
    apply_norm(layer, "weight_norm", norm_no_scale=True, norm_target_norm=2.0)
    assert torch.allclose(layer.weight.norm(dim=1), torch.full((6,), 2.0), atol=1e-5)
    assert "weight_g" not in dict(layer.named_parameters())

    clipped = nn.Linear(10, 6)
    with torch.no_grad():
        clipped.weight.copy_(w)
    apply_norm(clipped, "weight_norm", norm_no_scale=True, norm_clip=True, norm_clip_value=3.0)
    factor = torch.clamp(1.0 / norms, max=3.0)  # min(t, 1 / ||W_i||)
    assert (1.0 / norms > 3.0).any() and (1.0 / norms < 3.0).any()
    assert torch.allclose(clipped.weight, w * factor, atol=1e-6)


@pytest.mark.parametrize("make,dim,shape", LAYERS)
def test_spectral_norm_no_scale_has_unit_sigma_after_one_reset(make, dim, shape):
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    apply_norm(layer, "spectral_norm", norm_no_scale=True)
    reset_norm(layer)
    assert abs(_sigma(_rows(layer.weight, dim)) - 1.0) < 1e-3


def test_spectral_norm_scale_target_and_clip():
    torch.manual_seed(2)
    layer = nn.Linear(20, 16)
    w = layer.weight.detach().clone()
    apply_norm(layer, "spectral_norm", norm_target_norm=0.5)
    # g starts at target_norm for every row (TorchDEQ), so W_eff starts at sigma 0.5.
    assert torch.allclose(layer.weight_g, torch.full((16, 1), 0.5))
    assert abs(_sigma(layer.weight) - 0.5) < 1e-3
    with torch.no_grad():
        layer.weight_g.copy_(torch.rand(16, 1) * 2)
    reset_norm(layer)
    expected = w * layer.weight_g / _sigma(w)  # row-wise g / sigma
    assert torch.allclose(layer.weight, expected, rtol=1e-3, atol=1e-6)

    clipped = nn.Linear(20, 16)
    with torch.no_grad():
        clipped.weight.copy_(w)
    apply_norm(clipped, "spectral_norm", norm_clip=True, norm_clip_value=0.3)
    with torch.no_grad():
        clipped.weight_g.copy_(torch.linspace(0.01, 2.0, 16).unsqueeze(1) * _sigma(w))
    reset_norm(clipped)
    factor = torch.clamp(clipped.weight_g / _sigma(w), max=0.3)  # g / sigma runs 0.01 .. 2
    assert torch.allclose(clipped.weight, w * factor, rtol=1e-3, atol=1e-6)


def test_spectral_norm_gradient_matches_dense_sigma():
    """With converged u, v, d(W / sigma(W)) matches autograd through an exact SVD."""
    torch.manual_seed(3)
    w = torch.randn(9, 5, dtype=torch.float64)
    layer = nn.Linear(5, 9).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    apply_norm(layer, "spectral_norm", norm_no_scale=True)
    reset_norm(layer)
    probe = torch.randn(9, 5, dtype=torch.float64)
    (layer.weight * probe).sum().backward()
    dense = w.clone().requires_grad_()
    (dense / torch.linalg.matrix_norm(dense, ord=2) * probe).sum().backward()
    assert torch.allclose(layer.weight_orig.grad, dense.grad, atol=1e-6)


@pytest.mark.parametrize("norm_type", ["weight_norm", "spectral_norm"])
def test_remove_norm_keeps_outputs(norm_type):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 10 * 10, 5))
    apply_norm(model, norm_type)
    reset_norm(model)  # the first reset converges spectral norm's power iteration; later ones step once
    with torch.no_grad():  # new g and W: spectral norm's u, v are far from converged after the reset
        for name, p in model.named_parameters():
            if name.endswith("_g"):
                p.mul_(torch.rand_like(p) + 0.5)
            elif name.endswith(("_v", "_orig")):
                p.copy_(torch.randn_like(p) * 0.1)
    reset_norm(model)
    x = torch.randn(2, 3, 8, 8)
    before = model(x).detach()
    remove_norm(model)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(("_g", "_v", "_orig")) for n in names) and not list(model.buffers())
    assert torch.allclose(model(x), before, atol=1e-6)


def test_filter_out_and_prefix_filter_out_skip_modules():
    model = nn.ModuleDict({"enc": nn.Linear(3, 3), "fuse_layers": nn.Linear(3, 3),
                           "block": nn.ModuleDict({"fuse": nn.Linear(3, 3), "enc": nn.Linear(3, 3)})})
    apply_norm(model, filter_out="fuse", prefix_filter_out=["enc"])
    normed = {name for name, m in model.named_modules() if hasattr(m, "weight_v")}
    assert normed == {"block.enc"}


def test_subclasses_and_registered_modules():
    class MyLinear(nn.Linear):
        pass

    class Implicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(6, 6) * 3)
            self.Omega = nn.Parameter(torch.randn(6, 4))

        def forward(self, z, u):
            return torch.relu(z @ self.W.T + u @ self.Omega.T)

    register_norm_module(Implicit, "spectral_norm", names=["W", "Omega"], dims=[0, 0])
    model = nn.ModuleList([MyLinear(4, 4), Implicit()])
    apply_norm(model, "spectral_norm", norm_no_scale=True)
    assert hasattr(model[0], "weight_orig")
    assert abs(_sigma(model[1].W) - 1) < 1e-3 and abs(_sigma(model[1].Omega) - 1) < 1e-3
    assert model[1](torch.randn(2, 6), torch.randn(2, 4)).shape == (2, 6)


def test_args_win_over_keywords_for_every_config_type():
    parser = add_deq_args(argparse.ArgumentParser())
    sources = [parser.parse_args("--norm_type spectral_norm --norm_no_scale".split()),
               {"norm_type": "spectral_norm", "norm_no_scale": True, "lr": 0.1},
               OmegaConf.create({"norm_type": "spectral_norm", "norm_no_scale": True})]
    for args in sources:
        layer = nn.Linear(5, 5)
        apply_norm(layer, "weight_norm", args=args, norm_no_scale=False)
        assert isinstance(layer._deq_norm, SpectralNorm) and not layer._deq_norm.learn_scale
    layer = nn.Linear(5, 5)
    apply_norm(layer, "spectral_norm", args={"lr": 0.1}, clip=True, clip_value=0.5)  # TorchDEQ's keywords
    assert layer._deq_norm.clip and layer._deq_norm.clip_value == 0.5
    apply_norm(nn.Linear(2, 2), args={"norm_type": "none"})  # 'none' leaves the model alone
    with pytest.raises(TypeError, match="norm_clip"):
        apply_norm(nn.Linear(2, 2), norm_clipping=True)
    with pytest.raises(ValueError, match="weight_norm"):
        apply_norm(nn.Linear(2, 2), "layer_norm")
    with pytest.raises(ValueError, match="norm_clip_value"):
        apply_norm(nn.Linear(2, 2), norm_clip_value=-1.0)


def test_one_recomputation_per_deq_forward(monkeypatch):
    from core.deq import get_deq, reset_deq

    calls = {"compute": 0, "f": 0}
    original = WeightNorm.compute_weight

    def counting(self, *args, **kwargs):
        calls["compute"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WeightNorm, "compute_weight", counting)
    torch.manual_seed(5)
    layer = nn.Linear(16, 16)
    apply_norm(layer, "weight_norm", norm_no_scale=True, norm_target_norm=0.95)
    deq = get_deq(f_max_iter=30, f_tol=1e-30, grad=1)
    x = torch.randn(4, 16)

    def f(z):
        calls["f"] += 1
        return torch.tanh(layer(z)) + x

    for _ in range(2):
        calls.update(compute=0, f=0)
        reset_deq(layer)
        z_out, _ = deq(f, torch.zeros(4, 16))
        z_out[-1].sum().backward()
        assert calls["f"] >= 30 and calls["compute"] == 1
    assert layer.weight_v.grad is not None and layer.weight_v.grad.abs().sum() > 0
