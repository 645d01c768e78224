"""Flow metrics against hand-computed values, the padder, and the fixed-point-correction loss."""
import pytest
import torch

from zoo.deq_flow.metrics import FlowMeter, flow_loss
from zoo.deq_flow.model import InputPadder


def _field(vectors, shape=(2, 2)):
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 2, *shape)


def test_aepe_and_npx_accuracy_by_hand():
    gt = torch.zeros(1, 2, 2, 2)
    pred = _field([(0.3, 0.4), (0.0, 2.0), (3.0, 4.0), (6.0, 8.0)])  # EPE 0.5, 2, 5, 10
    meter = FlowMeter("pixels")
    meter.update(pred, gt)
    out = meter.result("s")
    assert out["s/aepe"] == pytest.approx(17.5 / 4)
    assert (out["s/1px"], out["s/3px"], out["s/5px"]) == pytest.approx((25.0, 50.0, 50.0))
    masked = FlowMeter("pixels")
    masked.update(pred, gt, torch.tensor([[[1.0, 1.0], [0.0, 1.0]]]))  # drops the EPE-5 pixel
    assert masked.result("s")["s/aepe"] == pytest.approx(12.5 / 3)


def test_kitti_aepe_is_a_mean_of_image_means_and_f1_is_pooled():
    gt = _field([(10.0, 0.0), (100.0, 0.0), (1.0, 0.0), (0.0, 0.0)])
    pred_a = gt + _field([(4.0, 0.0), (4.0, 0.0), (4.0, 0.0), (9.0, 9.0)])
    # image A, 3 valid pixels: EPE 4, 4, 4 -> mean 4; outliers: 4 > 3 and 4/10, 4/1 > 5%: 2 (4/100 is not)
    valid_a = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    gt_b = _field([(2.0, 0.0)] * 4)
    pred_b = gt_b + _field([(1.0, 0.0)] * 4)  # image B: EPE 1 everywhere, no outlier
    meter = FlowMeter("kitti")
    meter.update(pred_a, gt, valid_a)
    meter.update(pred_b, gt_b, torch.ones(1, 2, 2))
    out = meter.result("kitti")
    assert out["kitti/aepe"] == pytest.approx((4.0 + 1.0) / 2)      # not (3*4 + 4*1) / 7
    assert out["kitti/f1_all"] == pytest.approx(100.0 * 2 / 7)


@pytest.mark.parametrize("mode", ["sintel", "kitti"])
def test_padder_round_trips(mode):
    x = torch.randn(2, 3, 37, 50)
    padder = InputPadder(x.shape, mode)
    (padded,) = padder.pad_(x)
    assert padded.shape[-2:] == (40, 56)
    assert torch.equal(padder.unpad(padded), x)
    left, right, top, bottom = padder.pad
    assert (left, right) == (3, 3)
    assert (top, bottom) == ((1, 2) if mode == "sintel" else (0, 3))
    below = padded[..., top + 37:, left:left + 50]  # replicate padding: copies of the last row
    assert torch.equal(below, x[..., -1:, :].expand_as(below))


def test_flow_loss_weights_the_states_by_gamma_and_masks_invalid_and_huge_flow():
    gt = torch.zeros(1, 2, 2, 2)
    gt[0, 0, 1, 1] = 500.0                       # |gt| >= 400: left out, as RAFT
    valid = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    first, last = torch.full((1, 2, 2, 2), 2.0), torch.full((1, 2, 2, 2), 1.0)
    first[0, :, 0, 1] = 100.0                    # an invalid pixel: no effect
    # masked L1 = sum over kept pixels of |u| + |v|, over all N*2*H*W = 8 entries
    l_first, l_last = (2 * 2 * 2) / 8, (2 * 1 * 2) / 8
    assert float(flow_loss([first, last], gt, valid, gamma=0.8)) == pytest.approx(0.8 * l_first + l_last)
