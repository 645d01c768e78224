"""Loading a TorchDEQ-zoo MDEQ state dict (its key names) into our model."""
import pytest
import torch

from zoo.mdeq.convert import load_torchdeq_checkpoint, torchdeq_to_ours
from zoo.mdeq.model import MDEQ, get_size


def _bn(prefix, c, affine=True):
    keys = {f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
            f"{prefix}.num_batches_tracked": ()}
    if affine:
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)})
    return keys


def _wn_conv(prefix, cout, cin, k):
    return {f"{prefix}.weight_g": (cout, 1, 1, 1), f"{prefix}.weight_v": (cout, cin, k, k)}


def _gn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def torchdeq_layout(size):
    """Key -> shape of the TorchDEQ zoo's MDEQClsNet (deq-zoo/mdeq_cifar), written from its
    module structure: downsample / stage0 / fullstage (branches, fuse_layers with
    Up/DownsampleModule `.net`, post_fuse_layers) / incre_modules / downsamp_modules /
    final_layer / classifier, weight norm on fullstage, DataParallel's `module.` prefix."""
    ch, head, n, e = size.channels, size.head_channels, size.num_branches, size.expansion
    keys = {"downsample.0.weight": (ch[0], 3, 3, 3), **_bn("downsample.1", ch[0]),
            "downsample.3.weight": (ch[0], ch[0], 3, 3), **_bn("downsample.4", ch[0])}
    if n > 2:
        keys.update({"stage0.0.weight": (ch[0], ch[0], 1, 1), **_bn("stage0.1", ch[0])})
    for i, c in enumerate(ch):
        b = f"fullstage.branches.{i}.blocks.0"
        keys.update({**_wn_conv(f"{b}.conv1", e * c, c, 3), **_gn(f"{b}.gn1", e * c),
                     **_wn_conv(f"{b}.conv2", c, e * c, 3), **_gn(f"{b}.gn2", c), **_gn(f"{b}.gn3", c)})
        for j in range(n):
            f = f"fullstage.fuse_layers.{i}.{j}.net"
            if j > i:
                keys.update({**_wn_conv(f"{f}.conv", c, ch[j], 1), **_gn(f"{f}.gnorm", c)})
            for k in range(i - j):
                out = c if k == i - j - 1 else ch[j]
                keys.update({**_wn_conv(f"{f}.{k}.conv", out, ch[j], 3), **_gn(f"{f}.{k}.gnorm", out)})
        keys.update({**_wn_conv(f"fullstage.post_fuse_layers.{i}.conv", c, c, 1),
                     **_gn(f"fullstage.post_fuse_layers.{i}.gnorm", c)})
        h, p = f"incre_modules.{i}.0", head[i]
        keys.update({f"{h}.conv1.weight": (p, c, 1, 1), **_bn(f"{h}.bn1", p, affine=False),
                     f"{h}.conv2.weight": (p, p, 3, 3), **_bn(f"{h}.bn2", p, affine=False),
                     f"{h}.conv3.weight": (4 * p, p, 1, 1), **_bn(f"{h}.bn3", 4 * p, affine=False),
                     f"{h}.downsample.0.weight": (4 * p, c, 1, 1), **_bn(f"{h}.downsample.1", 4 * p)})
    for i in range(n - 1):
        keys.update({f"downsamp_modules.{i}.0.weight": (4 * head[i + 1], 4 * head[i], 3, 3),
                     f"downsamp_modules.{i}.0.bias": (4 * head[i + 1],), **_bn(f"downsamp_modules.{i}.1", 4 * head[i + 1])})
    keys.update({"final_layer.0.weight": (size.final_channels, 4 * head[-1], 1, 1),
                 "final_layer.0.bias": (size.final_channels,), **_bn("final_layer.1", size.final_channels),
                 "classifier.weight": (size.num_classes, size.final_channels), "classifier.bias": (size.num_classes,)})
    return {f"module.{k}": v for k, v in keys.items()}


def fixture_state_dict(size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchdeq_layout(size).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var") or key.endswith("weight_g"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen)
    return state


@pytest.mark.parametrize("name", ["tiny", "large"])
def test_torchdeq_checkpoint_loads_every_tensor_into_its_place(name, tmp_path):
    size = get_size(name)
    state = fixture_state_dict(size)
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


def test_weight_norm_folds_into_a_model_without_norm():
    size = get_size("tiny")
    state = fixture_state_dict(size, seed=1)
    normed, plain = MDEQ(size), MDEQ(size, deq={"norm_type": "none"})
    load_torchdeq_checkpoint(normed, state)
    load_torchdeq_checkpoint(plain, {"state_dict": state})
    normed.eval(), plain.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, _ = normed(x, solver_kwargs={"f_max_iter": 3})
        b, _ = plain(x, solver_kwargs={"f_max_iter": 3})
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-4, atol=1e-4)


def test_wrong_size_is_an_error_listing_the_keys():
    state = fixture_state_dict(get_size("tiny"))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchdeq_checkpoint(MDEQ(get_size("tiny", channels=(16, 16))), state)
    without_stage0 = {k: v for k, v in fixture_state_dict(get_size("large")).items() if "stage0" not in k}
    with pytest.raises(ValueError, match=r"missing: \['injection"):
        load_torchdeq_checkpoint(MDEQ("large"), without_stage0)


def test_key_renaming_drops_prefixes_and_the_ift_copy():
    renamed = torchdeq_to_ours({"module.module.fullstage.post_fuse_layers.0.gnorm.weight": torch.ones(1),
                                "fullstage_copy.branches.0.blocks.0.conv1.weight_v": torch.ones(1)})
    assert list(renamed) == ["f.post_fuse.0.gn.weight"]
