"""A small DEQ classifier learns a toy problem with each backward pass (IFT, phantom, unrolled)."""
import pytest
import torch
from torch import nn

from core.deq import get_deq


def toy_data(n=128, seed=0):
    """Four Gaussian blobs on a circle, labelled alternately (an XOR: not linearly separable)."""
    gen = torch.Generator().manual_seed(seed)
    blob = torch.randint(0, 4, (n,), generator=gen)
    angle = blob * torch.pi / 2
    x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) + 0.3 * torch.randn(n, 2, generator=gen)
    return x, blob % 2


class DEQClassifier(nn.Module):
    def __init__(self, deq_options, hidden=32):
        super().__init__()
        self.inject = nn.Linear(2, hidden)
        self.cell = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.cell.weight, gain=0.5)
        self.head = nn.Linear(hidden, 2)
        self.deq = get_deq(**deq_options)

    def forward(self, x):
        u = self.inject(x)
        z_out, info = self.deq(lambda z: torch.tanh(self.cell(z) + u), torch.zeros_like(u))
        return self.head(z_out[-1]), info


# An approximate backward solve is fine for training; its one warning is tested elsewhere.
@pytest.mark.filterwarnings("ignore:DEQ backward solve did not reach")
@pytest.mark.parametrize("options", [
    dict(ift=True, f_max_iter=15, f_tol=1e-4, b_max_iter=15, b_tol=1e-4),
    dict(grad=3, tau=0.8, f_max_iter=15, f_tol=1e-4),
    dict(f_max_iter=0, grad=8, eval_f_max_iter=8),
], ids=["ift", "phantom", "unrolled"])
def test_training_lowers_the_loss(options):
    torch.manual_seed(0)
    x, y = toy_data()
    model = DEQClassifier(options)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(50):
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.eval()
    with torch.no_grad():
        accuracy = (model(x)[0].argmax(1) == y).float().mean()
    assert accuracy > 0.8
