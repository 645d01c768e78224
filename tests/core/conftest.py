"""Fixtures shared by the engine's tests."""
import pytest
import torch


def _tanh_system(dim=16, batch=3, seed=0):
    """Leaf tensors (W, U, b, x) of f(z) = tanh(W z + U x + b) with ||W||_2 = 0.8, float64."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    w = 0.8 * w / torch.linalg.matrix_norm(w, 2)
    u = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (w, u, b, x)]


@pytest.fixture
def tanh_system():
    """The factory `tanh_system(dim=16, batch=3, seed=0)` of a contractive tanh layer."""
    return _tanh_system
