"""DEQ-Flow model: reference parameter counts, a training step of every paper size, the
correlation lookup, convex upsampling, frozen BatchNorm, and fixed-point reuse."""
import time

import pytest
import torch

from zoo.deq_flow.metrics import flow_loss
from zoo.deq_flow.model import CorrPyramid, DEQFlow, RAFTBaseline, coords_grid, count_parameters
from zoo.deq_flow.synthetic import SyntheticFlow

STEP_DEQ = dict(f_solver="fixed_point_iter", f_max_iter=4, n_states=2, grad=1)


@pytest.mark.parametrize("size,reference", [("tiny", 2.49e6), ("B", 5.243e6), ("H", 13.395e6)])
def test_parameter_counts_match_the_reference(size, reference):
    # DEQ-Flow's log/val.txt and the upstream code, counted with weight norm on the update block
    n = count_parameters(DEQFlow(size))
    digits = 2 if size == "tiny" else 3
    assert round(n / 1e6, digits) == pytest.approx(reference / 1e6)


@pytest.mark.parametrize("size", ["tiny", "B", "H"])
def test_one_training_step_is_finite_with_a_gradient_on_every_parameter(size):
    torch.manual_seed(0)
    model = DEQFlow(size, deq=STEP_DEQ).train()
    img1, img2 = torch.rand(2, 1, 3, 64, 64) * 2 - 1
    gt, valid = torch.randn(1, 2, 64, 64), torch.ones(1, 64, 64)
    t0 = time.perf_counter()
    flows, info, (h, flow) = model(img1, img2)
    assert len(flows) == 2 and flows[-1].shape == (1, 2, 64, 64) and flow.shape == (1, 2, 8, 8)
    loss = flow_loss(flows, gt, valid)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert no_grad == []
    assert time.perf_counter() - t0 < 120


def test_correlation_lookup_matches_dot_products_in_raft_window_order():
    torch.manual_seed(0)
    f1, f2 = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    corr = CorrPyramid(f1, f2, levels=2, radius=2)
    out = corr.lookup(coords_grid(1, 16, 16))
    assert out.shape == (1, 2 * 25, 16, 16)
    y, x = 5, 7

    def dot(dx, dy):
        return float((f1[0, :, y, x] * f2[0, :, y + dy, x + dx]).sum() / 8 ** 0.5)

    r = 2
    for dx, dy in [(0, 0), (1, 0), (0, 1), (-2, 1)]:
        k = (dx + r) * (2 * r + 1) + (dy + r)  # x offset along the first window axis
        assert float(out[0, k, y, x]) == pytest.approx(dot(dx, dy), abs=1e-5)


def test_convex_upsampling_of_a_constant_flow_is_8x_that_flow():
    flow = torch.tensor([1.5, -2.0]).view(1, 2, 1, 1).expand(1, 2, 6, 5)
    up = DEQFlow.upsample(flow, torch.randn(1, 576, 6, 5))
    assert up.shape == (1, 2, 48, 40)
    inner = up[..., 8:-8, 8:-8]  # border pixels mix in the zero padding
    assert torch.allclose(inner[0, 0], torch.full_like(inner[0, 0], 12.0), atol=1e-5)
    assert torch.allclose(inner[0, 1], torch.full_like(inner[0, 1], -16.0), atol=1e-5)


def test_frozen_batch_norm_stays_in_eval_mode_while_training():
    model = DEQFlow("tiny", freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.update_block.training
    before = bns[0].running_mean.clone()
    model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    assert torch.equal(bns[0].running_mean, before)


def test_context_encoder_without_norm_is_batch_independent():
    torch.manual_seed(0)
    model = DEQFlow("cpu", deq=STEP_DEQ, context_norm="none").train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.cnet.modules())
    img1, img2 = torch.rand(2, 2, 3, 64, 64) * 2 - 1
    both = model(img1, img2)[0][-1]
    first = model(img1[:1], img2[:1])[0][-1]  # no batch statistics: pair 0 alone gives the same flow
    assert torch.allclose(both[:1], first, atol=1e-5)
    with pytest.raises(ValueError, match="context_norm"):
        DEQFlow("cpu", context_norm="group")


def test_warm_start_from_the_previous_frame_converges_in_fewer_steps():
    torch.manual_seed(0)
    model = DEQFlow("cpu", deq=dict(f_solver="fixed_point_iter", f_max_iter=40, f_tol=3e-2,
                                    f_stop_mode="rel")).eval()
    frames, _, _ = SyntheticFlow(1, size=(64, 64), seed=0, frames=3)[0]
    with torch.no_grad():
        _, _, state = model(frames[None, 0], frames[None, 1])
        _, cold, _ = model(frames[None, 1], frames[None, 2])
        _, warm, _ = model(frames[None, 1], frames[None, 2], init=state)
    assert float(cold["rel_lowest"]) <= 3e-2 and float(warm["rel_lowest"]) <= 3e-2  # both converged
    assert float(warm["nstep"]) < 0.5 * float(cold["nstep"])


def test_raft_baseline_returns_every_update():
    model = RAFTBaseline(iters=3, eval_iters=5).train()
    flows, info, state = model(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    assert len(flows) == 3 and flows[0].shape == (1, 2, 128, 128) and state is None
    model.eval()
    with torch.no_grad():
        flows, info, _ = model(torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128),
                               solver_kwargs={"f_max_iter": 2})
    assert len(flows) == 2 and float(info["nstep"]) == 2
