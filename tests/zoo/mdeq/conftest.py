"""Fixtures of the MDEQ tests: CIFAR-10 in its real on-disk format and a state dict with
the TorchDEQ zoo MDEQ's key names."""
import pytest
import torch

from zoo.common.cifar import write_cifar10


@pytest.fixture
def cifar_writer():
    return write_cifar10



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


@pytest.fixture
def torchdeq_state_dict():
    """`fixture_state_dict(size, seed=0)`: random tensors under the TorchDEQ zoo's names."""
    return fixture_state_dict
