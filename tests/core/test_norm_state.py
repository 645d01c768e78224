"""Normalised modules survive what training code does to modules: checkpoints (ours and
TorchDEQ's), deepcopy, pickling, dtype/device moves, in-place updates, DDP."""
import copy
import io
import os
import socket

import pytest
import torch
from torch import nn

from core.norm import apply_norm, reset_norm

NORMS = ["weight_norm", "spectral_norm"]


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.ConvTranspose2d(4, 3, 3), nn.Flatten(),
                         nn.Linear(3 * 6 * 6, 5))


def _normed(seed, norm_type):
    model = _model(seed)
    apply_norm(model, norm_type)
    with torch.no_grad():  # move away from the initial W_eff = W (weight norm)
        for name, p in model.named_parameters():
            if name.endswith("_g"):
                p.mul_(torch.rand_like(p) + 0.5)
    reset_norm(model)
    return model


X = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm_type", NORMS)
def test_state_dict_round_trip_and_load_without_reset(norm_type):
    source, target = _normed(0, norm_type), _normed(1, norm_type)
    assert not torch.allclose(source(X), target(X))
    state = source.state_dict()
    assert not any(k.endswith(".weight") for k in state)  # W_eff is derived, never saved
    target.load_state_dict(state)
    # No reset_norm: the in-place load is detected and W_eff recomputed on the next call.
    assert torch.allclose(target(X), source(X), atol=1e-6)


@pytest.mark.parametrize("norm_type", NORMS)
def test_torchdeq_checkpoints_load_with_the_same_outputs(norm_type):
    torchdeq = pytest.importorskip("torchdeq")
    theirs, ours = _model(0), _model(1)
    torchdeq.apply_norm(theirs, norm_type)
    torchdeq.reset_norm(theirs)
    apply_norm(ours, norm_type)
    state = theirs.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(state)
    reset_norm(ours)  # spectral norm: our first reset converges u, v (TorchDEQ's made 1 step)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval(), ours.eval()  # no power step now: both read the same u, v
    torchdeq.reset_norm(theirs)
    reset_norm(ours)
    assert torch.allclose(ours(X), theirs(X), atol=1e-5)


@pytest.mark.parametrize("norm_type", NORMS)
def test_deepcopy_and_pickle_give_working_independent_modules(norm_type):
    model = _normed(0, norm_type)
    out = model(X).detach()
    for clone in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        assert torch.allclose(clone(X), out, atol=1e-6)
        clone(X).sum().backward()
        grads = [p.grad for n, p in clone.named_parameters() if n.endswith(("_v", "_orig"))]
        assert len(grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("norm_type", NORMS)
def test_dtype_move_and_optimizer_step_refresh_the_weight(norm_type):
    model = _normed(0, norm_type)
    model.double()  # no reset: the stale float32 W_eff is replaced on the next call
    out64 = model(X.double())
    assert out64.dtype == torch.float64
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out64.square().sum().backward()
    opt.step()
    expected = copy.deepcopy(model)
    reset_norm(expected)
    assert not torch.allclose(model(X.double()), out64)  # the step is seen without reset_norm
    assert torch.allclose(model(X.double()), expected(X.double()), atol=1e-10)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_single_process_matches_plain_gradients():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        plain = _normed(0, "spectral_norm")
        wrapped = copy.deepcopy(plain)
        ddp = DistributedDataParallel(wrapped)
        for step in range(2):  # two steps: the graph of W_eff is rebuilt by reset_norm
            reset_norm(plain), reset_norm(wrapped)
            plain(X).square().mean().backward()
            ddp(X).square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", NORMS)
def test_cuda_move_without_reset(norm_type):
    model = _normed(0, norm_type)
    out = model(X).detach()
    model.to("cuda")
    assert torch.allclose(model(X.to("cuda")).cpu(), out, atol=1e-5)
    reset_norm(model)
    assert model[0].weight.device.type == "cuda"
