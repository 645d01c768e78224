"""The DDPM UNet: parameter counts against the reference, the published key layout, one
forward and training step, and the converter on fixture state dicts in the DDPM formats."""
import pytest
import torch

from zoo.deq_ddim.convert import load_ddpm_checkpoint, load_ddpm_state, unwrap_checkpoint
from zoo.deq_ddim.diffusion import Schedule, ddpm_loss
from zoo.deq_ddim.model import build_unet, count_parameters, get_size, unet_sizes


def test_parameter_counts_match_the_reference():
    counts = unet_sizes()
    assert counts["cifar10"] == 35_746_307   # DDPM CIFAR-10, 35.75M (computed from the reference code)
    assert counts["digits"] == 176_849


def _gn(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def _conv(p, cout, cin, k):
    return {f"{p}.weight": (cout, cin, k, k), f"{p}.bias": (cout,)}


def _res(p, cin, cout, temb):
    keys = {**_gn(f"{p}.norm1", cin), **_conv(f"{p}.conv1", cout, cin, 3),
            f"{p}.temb_proj.weight": (cout, temb), f"{p}.temb_proj.bias": (cout,),
            **_gn(f"{p}.norm2", cout), **_conv(f"{p}.conv2", cout, cout, 3)}
    if cin != cout:
        keys.update(_conv(f"{p}.nin_shortcut", cout, cin, 1))
    return keys


def _attn(p, c):
    return {**_gn(f"{p}.norm", c), **{k: v for n in ("q", "k", "v", "proj_out") for k, v in _conv(f"{p}.{n}", c, c, 1).items()}}


def ddpm_layout(ch=128, mult=(1, 2, 2, 2), nres=2, attn=(16,), res=32, cin=3):
    """Key -> shape of the DDPM UNet as pesser/pytorch_diffusion's converted checkpoints
    name it (written from the model description in the module docs, not from our module)."""
    t = 4 * ch
    keys = {"temb.dense.0.weight": (t, ch), "temb.dense.0.bias": (t,), "temb.dense.1.weight": (t, t),
            "temb.dense.1.bias": (t,), **_conv("conv_in", ch, cin, 3)}
    skips, c, r = [ch], ch, res
    for lvl, m in enumerate(mult):
        for i in range(nres):
            keys.update(_res(f"down.{lvl}.block.{i}", c, ch * m, t))
            c = ch * m
            if r in attn:
                keys.update(_attn(f"down.{lvl}.attn.{i}", c))
            skips.append(c)
        if lvl < len(mult) - 1:
            keys.update(_conv(f"down.{lvl}.downsample.conv", c, c, 3))
            skips.append(c)
            r //= 2
    keys.update({**_res("mid.block_1", c, c, t), **_attn("mid.attn_1", c), **_res("mid.block_2", c, c, t)})
    for lvl in reversed(range(len(mult))):
        for i in range(nres + 1):
            keys.update(_res(f"up.{lvl}.block.{i}", c + skips.pop(), ch * mult[lvl], t))
            c = ch * mult[lvl]
            if r in attn:
                keys.update(_attn(f"up.{lvl}.attn.{i}", c))
        if lvl:
            keys.update(_conv(f"up.{lvl}.upsample.conv", c, c, 3))
            r *= 2
    keys.update({**_gn("norm_out", c), **_conv("conv_out", cin, c, 3)})
    return keys


def test_cifar10_unet_has_the_published_key_layout():
    with torch.device("meta"):
        model = build_unet("cifar10")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == ddpm_layout()
    assert "down.1.block.0.nin_shortcut.weight" in ours and "down.0.block.0.nin_shortcut.weight" not in ours
    assert sum(v.numel() for v in model.state_dict().values()) == count_parameters(model)


def _fixture_state(layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in layout.items()}


DIGITS = dict(ch=16, mult=(1, 2), nres=1, attn=(4,), res=8, cin=1)


@pytest.mark.parametrize("container", ["plain", "dataparallel", "ddim_list", "ddim_list_ema"])
def test_converter_loads_ddpm_checkpoints(tmp_path, container):
    state = _fixture_state(ddpm_layout(**DIGITS))
    ema = {f"module.{k}": v + 1.0 for k, v in state.items()}
    obj = {"plain": state, "dataparallel": {f"module.{k}": v for k, v in state.items()},
           "ddim_list": [{f"module.{k}": v for k, v in state.items()}, {"opt": 1}, 5, 100, ema],
           "ddim_list_ema": [{f"module.{k}": v for k, v in state.items()}, {"opt": 1}, 5, 100, ema]}[container]
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    model = build_unet("digits")
    load_ddpm_checkpoint(model, path, ema=container == "ddim_list_ema")
    shift = 1.0 if container == "ddim_list_ema" else 0.0
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value + shift)


def test_converter_names_what_does_not_fit():
    state = _fixture_state(ddpm_layout(**DIGITS))
    del state["conv_out.bias"]
    state["conv_in.weight"] = torch.zeros(16, 3, 3, 3)  # a CIFAR (3-channel) stem
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"(?s)missing: conv_out.bias\n.*unexpected: extra.weight\n.*"
                       r"mis-shaped: conv_in.weight: checkpoint \(16, 3, 3, 3\)"):
        load_ddpm_state(build_unet("digits"), state)
    with pytest.raises(ValueError, match="EMA"):
        unwrap_checkpoint([state], ema=True)


def test_digits_unet_trains_one_step_with_a_gradient_on_every_parameter():
    torch.manual_seed(0)
    model = build_unet("digits")
    loss = ddpm_loss(model, Schedule(), torch.rand(4, 1, 8, 8) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_cifar10_unet_trains_one_step_at_32x32():
    torch.manual_seed(0)
    model = build_unet("cifar10")
    loss = ddpm_loss(model, Schedule(), torch.rand(1, 3, 32, 32) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss) and 0.1 < float(loss.detach()) < 10.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_get_size_overrides_and_rejects_unknown_sizes():
    assert get_size("digits", ch=32, ch_mult=[1, 2, 2]).ch_mult == (1, 2, 2)
    with pytest.raises(ValueError, match="model.size"):
        get_size("lsun")
