"""DEQ-Flow data: the real formats read back through the loaders, both folder layouts, RAFT's
augmentation, and the offline synthetic pairs and motorcycle pair."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.common import MissingDataError
from zoo.deq_flow.augment import FlowAugmentor
from zoo.deq_flow.layouts import FlowPairs, load_flow_dataset, resolve_root
from zoo.deq_flow.synthetic import SyntheticFlow, motorcycle_pair


def test_flo_pfm_and_kitti_png_read_back_through_torchvision(tmp_path, formats):
    from torchvision.datasets._optical_flow import _read_16bits_png_with_flow_and_valid_mask, _read_flo
    from torchvision.datasets.utils import _read_pfm

    rng = np.random.default_rng(1)
    flow = rng.normal(0, 7, size=(2, 5, 6)).astype(np.float32)
    formats["flo"](tmp_path / "a.flo", flow)
    formats["pfm"](tmp_path / "a.pfm", flow)
    valid = rng.random((5, 6)) < 0.5
    formats["kitti"](tmp_path / "a.png", flow, valid)
    assert np.array_equal(_read_flo(str(tmp_path / "a.flo")), flow)
    assert np.array_equal(_read_pfm(str(tmp_path / "a.pfm")), flow)  # bottom row first, flipped back
    kflow, kvalid = _read_16bits_png_with_flow_and_valid_mask(str(tmp_path / "a.png"))
    assert np.array_equal(kvalid, valid)
    assert np.abs(kflow - flow).max() <= 0.5 / 64 + 1e-6        # KITTI's 1/64 px quantisation
    assert np.abs(kflow - flow).max() > 0                        # ... which is really there


@pytest.mark.parametrize("layout", ["torchvision", "raft"])
def test_chairs_in_both_layouts(tmp_path, flow_trees, layout):
    flows = flow_trees["chairs"](tmp_path, layout)
    train, val = (FlowPairs(load_flow_dataset(tmp_path, "chairs", s)) for s in ("train", "val"))
    assert (len(train), len(val)) == (2, 1)
    img1, img2, flow, valid = val[0]
    assert img1.shape == (3, 24, 32) and -1 <= float(img1.min()) and float(img1.max()) <= 1
    assert torch.equal(flow, torch.from_numpy(flows[-1])) and bool(valid.all())


@pytest.mark.parametrize("layout", ["torchvision", "raft"])
def test_kitti_in_both_layouts_with_its_valid_mask(tmp_path, flow_trees, layout):
    truth = flow_trees["kitti"](tmp_path, layout)
    ds = FlowPairs(load_flow_dataset(tmp_path, "kitti", "train"))
    assert len(ds) == 2
    _, _, flow, valid = ds[1]
    assert torch.equal(valid.bool(), torch.from_numpy(truth[1][1]))
    assert (flow - torch.from_numpy(truth[1][0])).abs().max() <= 0.5 / 64 + 1e-6


@pytest.mark.parametrize("layout", ["torchvision", "raft"])
def test_hd1k_in_both_layouts(tmp_path, flow_trees, layout):
    flow_trees["hd1k"](tmp_path, layout)
    assert len(FlowPairs(load_flow_dataset(tmp_path, "hd1k", "train"))) == 2


def test_sintel_passes_scenes_and_flows(tmp_path, flow_trees):
    flows = flow_trees["sintel"](tmp_path)
    for p in ("clean", "final"):
        ds = FlowPairs(load_flow_dataset(tmp_path, "sintel", "train", p))
        assert len(ds) == 4 and sorted(ds.scenes) == ["alley_1", "alley_1", "market_2", "market_2"]
        i = next(i for i, (a, _) in enumerate(ds.base._image_list) if a.endswith("market_2/frame_0002.png"))
        assert ds.scenes[i] == "market_2"
        assert torch.equal(ds[i][2], torch.from_numpy(flows[("market_2", 2)]))


def test_things_reads_pfm_both_directions(tmp_path, flow_trees):
    flows = flow_trees["things"](tmp_path)
    ds = FlowPairs(load_flow_dataset(tmp_path, "things", "train", "clean"))
    assert len(ds) == 4  # 2 future + 2 past pairs of the left camera
    assert torch.equal(ds[0][2], torch.from_numpy(flows[("into_future", "left", 6)]))


def test_missing_dataset_names_both_layouts(tmp_path):
    with pytest.raises(MissingDataError, match=r"KittiFlow/training(.|\n)*KITTI(.|\n)*RAFT"):
        resolve_root(tmp_path, "kitti")
    with pytest.raises(MissingDataError, match="data.root is not set"):
        resolve_root(None, "sintel")


def test_dense_augmentation_crops_and_moves_the_flow_with_the_pixels():
    np.random.seed(0)
    torch.manual_seed(0)
    aug = FlowAugmentor((48, 64), -0.1, 0.6)
    img = torch.rand(3, 80, 100) * 255
    flow = torch.zeros(2, 80, 100)
    flow[0] = 3.0  # a constant horizontal flow: after scale, stretch and flips still constant, v = 0
    for _ in range(10):
        a, b, f, v = aug(img, img, flow, torch.ones(80, 100))
        assert a.shape == (3, 48, 64) and f.shape == (2, 48, 64) and v.shape == (48, 64)
        inner = f[:, 2:-2, 2:-2]
        assert torch.allclose(inner[1], torch.zeros_like(inner[1]), atol=1e-5)
        u = inner[0]
        assert float(u.std()) < 1e-4 and 3 * 2 ** -0.3 - 1e-4 <= abs(float(u.mean())) <= 3 * 2 ** 0.8 + 1e-4


def test_sparse_resize_keeps_only_measured_vectors():
    flow = torch.zeros(2, 10, 10)
    valid = torch.zeros(10, 10)
    flow[:, 4, 6] = torch.tensor([2.0, -1.0])
    valid[4, 6] = 1
    out, out_valid = FlowAugmentor.resize_sparse(flow, valid, 2.0, 1.5, (15, 20))
    assert out_valid.sum() == 1 and out_valid[6, 12] == 1
    assert torch.equal(out[:, 6, 12], torch.tensor([4.0, -1.5]))


def test_synthetic_flow_is_exact_and_in_range():
    ds = SyntheticFlow(8, size=(128, 128), seed=3)
    mags, warped_err, zero_err = [], [], []
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    for i in range(8):
        img1, img2, flow, valid = ds[i]
        mags.append(float((flow.norm(dim=0) * valid).sum() / valid.sum()))
        grid = torch.stack([(xs + flow[0]) / 127 * 2 - 1, (ys + flow[1]) / 127 * 2 - 1], -1)[None]
        warped = F.grid_sample(img2[None], grid, align_corners=True)[0]
        warped_err.append(float(((warped - img1).abs().mean(0) * valid).sum() / valid.sum()))
        zero_err.append(float(((img2 - img1).abs().mean(0) * valid).sum() / valid.sum()))
    assert 4.0 <= np.mean(mags) <= 8.0
    assert np.median(warped_err) < 0.3 * np.median(zero_err)  # the flow explains frame 2
    img1, _, flow, valid = ds[5]
    assert torch.equal(flow, ds[5][2]) and torch.equal(img1, ds[5][0])  # a function of the index
    assert not torch.equal(flow, SyntheticFlow(8, seed=4)[5][2])          # and of the seed
    assert 0.5 < float(valid.mean()) < 1.0  # some pixels leave the frame


def test_synthetic_sequences_repeat_the_motion():
    frames, flows, valids = SyntheticFlow(2, size=(128, 128), seed=0, frames=3, objects=())[1]
    assert frames.shape == (3, 3, 128, 128) and flows.shape == (2, 2, 128, 128)
    assert torch.allclose(flows[0], flows[1])  # background only: the same motion twice


def test_motorcycle_pair_flow_points_left_to_right():
    img1, img2, flow, valid = motorcycle_pair(downscale=4)
    assert img1.shape == (3, 125, 185) and flow.shape == (2, 125, 185)
    assert float(flow[0][valid > 0].max()) <= 0 and float(flow[1].abs().max()) == 0
    ys, xs = torch.meshgrid(torch.arange(125.0), torch.arange(185.0), indexing="ij")
    grid = torch.stack([(xs + flow[0]) / 184 * 2 - 1, ys / 124 * 2 - 1], -1)[None]
    warped = F.grid_sample(img2[None], grid, align_corners=True)[0]
    err = float(((warped - img1).abs().mean(0) * valid).sum() / valid.sum())
    zero = float(((img2 - img1).abs().mean(0) * valid).sum() / valid.sum())
    assert err < 0.5 * zero
