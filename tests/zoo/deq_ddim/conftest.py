"""Fixtures of the DEQ-DDIM tests: a toy float64 denoiser (tests/zoo/conftest.py sets one CPU thread)."""
import pytest
import torch



class ToyDenoiser(torch.nn.Module):
    """eps(x, t) = tanh(W x + b sin(t / 100)): smooth, nonlinear, t-dependent, float64."""

    def __init__(self, dim=16, seed=0, scale=0.3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=gen, dtype=torch.float64) * scale)
        self.b = torch.nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))

    def forward(self, x, t):
        h = x.reshape(x.shape[0], -1) @ self.w + self.b * torch.sin(t.to(x.dtype)[:, None] / 100.0)
        return torch.tanh(h).reshape(x.shape)


@pytest.fixture
def toy_denoiser():
    return ToyDenoiser
