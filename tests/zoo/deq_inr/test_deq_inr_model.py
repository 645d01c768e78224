"""DEQ-INR model: parameter counts, key names, one finite step of every filter / size /
baseline, and the warm start (amortised fixed point) counted in f evaluations."""
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.deq_inr.model import DEQINR, SIZES, CoordinateMap, Siren, count_parameters, get_size

FAST = {"f_max_iter": 6, "grad": 2}


def test_parameter_count_1L256D():
    # x_map 2 -> 512 (1,536), z_map 256x256 + bias (65,792) + weight norm's g (256), output 257
    assert count_parameters(DEQINR(2, 1, "1L256D")) == 67_841
    assert count_parameters(DEQINR(2, 1, "1L256D", deq={"norm_type": "none"})) == 67_585
    # 4L256D: x_map 2 -> 1280, four normalised layers
    assert count_parameters(DEQINR(2, 1, "4L256D")) == 3 * 1280 + 4 * (256 * 256 + 2 * 256) + 257


def test_key_names_follow_torchdeq():
    keys = set(DEQINR(2, 3, "1L256D", filter="gabor").state_dict())
    assert keys == {"injection.x_map.weight", "injection.x_map.bias", "injection.mu", "injection.gamma",
                    "f.z_init", "f.layers.0.z_map.bias", "f.layers.0.z_map.weight_g",
                    "f.layers.0.z_map.weight_v", "output_map.weight", "output_map.bias"}


def test_sizes_and_bad_names():
    assert SIZES["4L256D"] == get_size("4L256D") and get_size("1L2048D").width == 2048
    assert get_size("1L256D", width=64).width == 64
    with pytest.raises(ValueError, match="<layers>L<width>D"):
        get_size("big")


def test_injection_scale_and_bias():
    model = DEQINR(2, 1, "1L256D", input_scale=100.0)
    w, b = model.injection.x_map.weight, model.injection.x_map.bias
    # nn.Linear's U(+-1/sqrt(2)) times input_scale / sqrt(L + 1)
    assert float(w.abs().max()) <= 100.0 / math.sqrt(2) / math.sqrt(2) + 1e-4
    assert float(w.abs().max()) > 30.0
    assert float(b.abs().max()) <= math.pi


def test_coordinate_map_backward_is_linear_then_chunk():
    torch.manual_seed(0)
    x = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: CoordinateMap.apply(x, w, b, 3), (x, w, b))
    # one chunk unused: its gradient is zero, not an error
    grads = torch.autograd.grad(CoordinateMap.apply(x, w, b, 3)[1].sin().sum(), (x, w, b))
    by_autograd = torch.autograd.grad(F.linear(x, w, b).chunk(3, -1)[1].sin().sum(), (x, w, b))
    for mine, ref in zip(grads, by_autograd):
        assert torch.allclose(mine, ref)


@pytest.mark.parametrize("filter", ["siren_like", "gabor"])
def test_injection_gradients_match_autograd_linear(filter):
    torch.manual_seed(0)
    model = DEQINR(2, 1, "2L16D", filter=filter, input_scale=10.0, one_pass=True, deq={"norm_type": "none"})
    x = torch.rand(40, 2) * 2 - 1
    model(x)[0][0].square().sum().backward()
    mine = [p.grad.clone() for p in model.injection.parameters()]
    model.zero_grad()
    inj = model.injection
    u = inj.x_map(x)  # the plain nn.Linear then chunk, as before CoordinateMap
    if filter == "gabor":
        sq = x.square().sum(-1, keepdim=True) - 2 * x @ inj.mu.t() + inj.mu.square().sum(-1)[None]
        u = torch.sin(u) * torch.exp(-0.5 * inj.gamma[None] * sq)
    u = list(u.chunk(inj.chunks, -1))
    model.output_map(model.f(torch.zeros(40, 16), u, model.f.first(u))).square().sum().backward()
    for p, g in zip(inj.parameters(), mine):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-5)


def test_one_pass_is_f_applied_once_to_zero():
    torch.manual_seed(0)
    model = DEQINR(2, 1, "1L32D", one_pass=True, deq={"norm_type": "none"})
    x = torch.rand(10, 2) * 2 - 1
    out, info, _ = model(x)
    u = model.injection.x_map(x).chunk(2, dim=-1)
    by_hand = torch.sin(model.f.layers[0].z_map(torch.sin(u[0])) + u[1])
    assert torch.allclose(out[0], model.output_map(by_hand), atol=1e-6) and info == {}
    assert set(model.state_dict()) == set(DEQINR(2, 1, "1L32D", deq={"norm_type": "none"}).state_dict())


def test_equilibrium_is_a_fixed_point():
    torch.manual_seed(0)
    model = DEQINR(2, 1, "1L32D", input_scale=4.0, deq={"f_max_iter": 60, "f_tol": 1e-7}).eval()
    x = torch.rand(50, 2) * 2 - 1
    with torch.no_grad():
        out, info, z = model(x)
        u = model.injection(x)
        fz = model.f(z, u, model.f.first(u))
    assert float((fz - z).norm() / z.norm()) < 1e-4
    assert float(info["rel_lowest"].max()) < 1e-4


@pytest.mark.parametrize("filter", ["siren_like", "fourier", "gabor"])
@pytest.mark.parametrize("size", ["1L256D", "1L512D", "4L256D"])
def test_one_step_of_each_filter_and_camera_size(filter, size):
    torch.manual_seed(0)
    model = DEQINR(2, 1, size, filter=filter, input_scale=32.0, deq=FAST).train()
    x, y = torch.rand(16, 2) * 2 - 1, torch.rand(16, 1) * 2 - 1
    out, info, z = model(x)
    loss = F.mse_loss(out[-1], y)
    loss.backward()
    assert torch.isfinite(loss) and z.shape == (16, model.width)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["one_pass", "siren", "video_1L2048D"])
def test_one_step_of_the_baselines_and_the_video_size(kind):
    torch.manual_seed(0)
    if kind == "siren":
        model = Siren(3, 3)
    else:
        model = DEQINR(3, 3, "1L2048D" if kind.startswith("video") else "1L256D", input_scale=16.0,
                       one_pass=kind == "one_pass", deq={"f_max_iter": 4, "grad": 3, "n_states": 2})
    x, y = torch.rand(8, 3) * 2 - 1, torch.rand(8, 3) * 2 - 1
    out, _, _ = model(x)
    loss = sum(F.mse_loss(o, y) for o in out)
    loss.backward()
    assert len(out) == (2 if kind.startswith("video") else 1) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_siren_initialisation():
    model = Siren(2, 1, layers=3, width=64)
    first, hidden = model.net[0].linear.weight, model.net[1].linear.weight
    assert float(first.abs().max()) <= 1 / 2 and float(hidden.abs().max()) <= math.sqrt(6 / 64) / 30
    assert len(model.net) == 3 and count_parameters(model) == (2 * 64 + 64) + 2 * (64 * 64 + 64) + 65
