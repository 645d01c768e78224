"""Side by side with TorchDEQ 0.1.0 (installed for comparisons only): same states, same gradients.

Tolerances are out of reach, so both libraries run exactly f_max_iter steps.
"""
import warnings

import pytest
import torch

from core.deq import get_deq

torchdeq = pytest.importorskip("torchdeq")


@pytest.mark.parametrize("options", [
    dict(), dict(grad=3, tau=0.7), dict(n_states=2, grad=2), dict(core="indexing", indexing=[3, 7]),
    dict(hook_ift=True), dict(f_max_iter=0, grad=5), dict(ift=True),
], ids=["default", "phantom", "n_states", "indexing", "hook_ift", "unrolled", "ift"])
def test_states_and_gradients_match_torchdeq(options):
    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=torch.float64)
    w = (0.8 * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
    x = torch.randn(3, 16, dtype=torch.float64)
    kw = dict(dict(f_max_iter=12, f_tol=1e-300, b_tol=1e-300), **options)
    results = []
    for make in (get_deq, torchdeq.get_deq):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z_out, _ = make(**kw)(lambda z: torch.tanh(z @ w.T + x), torch.zeros(3, 16, dtype=torch.float64))
            grad = torch.autograd.grad(sum((z**2).sum() for z in z_out), w)[0]
        results.append((z_out, grad))
    (ours, g_ours), (theirs, g_theirs) = results
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    if options.get("ift"):
        # TorchDEQ's autograd.Function IFT takes J at f(z*) instead of z* (its hook variant
        # uses z*, as we do in both): equal up to the 12-step solve's residual.
        assert (g_ours - g_theirs).abs().max() < 1e-5 * g_theirs.abs().max()
    else:
        assert torch.equal(g_ours, g_theirs)
