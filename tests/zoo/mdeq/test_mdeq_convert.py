"""Loading a TorchDEQ-zoo MDEQ state dict (its key names) into our model."""
import pytest
import torch

from zoo.mdeq.convert import load_torchdeq_checkpoint, torchdeq_to_ours
from zoo.mdeq.model import MDEQ, get_size


@pytest.mark.parametrize("name", ["tiny", "large"])
def test_torchdeq_checkpoint_loads_every_tensor_into_its_place(name, tmp_path, torchdeq_state_dict):
    size = get_size(name)
    state = torchdeq_state_dict(size)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 50, "state_dict": state, "perf": 85.7}, path)
    model = MDEQ(name)
    load_torchdeq_checkpoint(model, str(path))
    ours = model.state_dict()
    assert len(ours) == len(state)
    pairs = {
        "stem.3.weight": "module.downsample.3.weight",
        "f.branches.1.blocks.0.conv2.weight_v": "module.fullstage.branches.1.blocks.0.conv2.weight_v",
        "f.fuse.0.1.gn.weight": "module.fullstage.fuse_layers.0.1.net.gnorm.weight",
        "f.fuse.1.0.0.conv.weight_v": "module.fullstage.fuse_layers.1.0.net.0.conv.weight_v",
        "f.post_fuse.1.gn.bias": "module.fullstage.post_fuse_layers.1.gnorm.bias",
        "head.incre.1.shortcut.0.weight": "module.incre_modules.1.0.downsample.0.weight",
        "head.incre.0.bn3.running_var": "module.incre_modules.0.0.bn3.running_var",
        "head.down.0.0.bias": "module.downsamp_modules.0.0.bias",
        "head.final.1.running_mean": "module.final_layer.1.running_mean",
        "head.classifier.weight": "module.classifier.weight",
    }
    if name == "large":
        pairs["injection.0.weight"] = "module.stage0.0.weight"
        pairs["f.fuse.3.0.2.gn.bias"] = "module.fullstage.fuse_layers.3.0.net.2.gnorm.bias"
    for ours_key, theirs_key in pairs.items():
        assert torch.equal(ours[ours_key].reshape(state[theirs_key].shape), state[theirs_key]), ours_key
    # The weight actually used by f is g * v / |v| of the checkpoint's g and v.
    from core.norm import reset_norm
    reset_norm(model.f)
    conv = model.f.branches[0].blocks[0].conv1
    v = state["module.fullstage.branches.0.blocks.0.conv1.weight_v"]
    g = state["module.fullstage.branches.0.blocks.0.conv1.weight_g"]
    expected = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(conv.weight, expected)


def test_weight_norm_folds_into_a_model_without_norm(torchdeq_state_dict):
    size = get_size("tiny")
    state = torchdeq_state_dict(size, seed=1)
    normed, plain = MDEQ(size), MDEQ(size, deq={"norm_type": "none"})
    load_torchdeq_checkpoint(normed, state)
    load_torchdeq_checkpoint(plain, {"state_dict": state})
    normed.eval(), plain.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, _ = normed(x, solver_kwargs={"f_max_iter": 3})
        b, _ = plain(x, solver_kwargs={"f_max_iter": 3})
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-4, atol=1e-4)


def test_wrong_size_is_an_error_listing_the_keys(torchdeq_state_dict):
    state = torchdeq_state_dict(get_size("tiny"))
    with pytest.raises(ValueError, match="mis-shaped"):
        load_torchdeq_checkpoint(MDEQ(get_size("tiny", channels=(16, 16))), state)
    without_stage0 = {k: v for k, v in torchdeq_state_dict(get_size("large")).items() if "stage0" not in k}
    with pytest.raises(ValueError, match=r"missing: injection"):
        load_torchdeq_checkpoint(MDEQ("large"), without_stage0)


def test_key_renaming_drops_prefixes_and_the_ift_copy():
    renamed = torchdeq_to_ours({"module.module.fullstage.post_fuse_layers.0.gnorm.weight": torch.ones(1),
                                "fullstage_copy.branches.0.blocks.0.conv1.weight_v": torch.ones(1)})
    assert list(renamed) == ["f.post_fuse.0.gn.weight"]
