"""Variational dropout: one mask per reset shared by every solver step, the right mask
shapes, the input's dtype/device, resampling on a new batch size; mixed_init."""
import pytest
import torch

from core.utils.dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d,
                                VariationalDropout3d, VariationalDropToken1d, VariationalDropToken2d,
                                VariationalDropToken3d, reset_dropout)
from core.utils.init import mixed_init

# (layer, input shape, token_first, dims along which the mask is constant)
CASES = [
    (VariationalDropout, (4, 5, 6), None, ()),
    (VariationalDropout1d, (4, 5, 6), True, (1,)),
    (VariationalDropout1d, (4, 6, 5), False, (2,)),
    (VariationalDropout2d, (4, 3, 5, 6), True, (1, 2)),
    (VariationalDropout2d, (4, 6, 3, 5), False, (2, 3)),
    (VariationalDropout3d, (2, 2, 3, 4, 6), True, (1, 2, 3)),
    (VariationalDropToken1d, (4, 5, 6), True, (2,)),
    (VariationalDropToken1d, (4, 6, 5), False, (1,)),
    (VariationalDropToken2d, (4, 3, 5, 6), True, (3,)),
    (VariationalDropToken3d, (2, 6, 2, 3, 4), False, (1,)),
]


@pytest.mark.parametrize("cls,shape,token_first,const_dims", CASES)
def test_mask_shape_scale_and_reuse(cls, shape, token_first, const_dims):
    torch.manual_seed(0)
    layer = cls(0.5) if token_first is None else cls(0.5, token_first=token_first)
    x = torch.ones(shape, dtype=torch.float64)
    out = layer(x)
    assert out.dtype == torch.float64
    assert set(out.unique().tolist()) <= {0.0, 2.0}  # kept entries scaled by 1 / (1 - p)
    for d in const_dims:  # the whole channel / token is dropped together
        assert torch.equal(out, out.narrow(d, 0, 1).expand_as(out))
    assert torch.equal(layer(x), out)  # same mask at every solver step
    reset_dropout(torch.nn.Sequential(layer))
    assert layer.mask is None


def test_reset_draws_new_masks_and_rate_is_p():
    torch.manual_seed(0)
    layer = VariationalDropout(0.3)
    x = torch.ones(64, 100)
    first = layer(x)
    assert abs((first == 0).float().mean().item() - 0.3) < 0.02
    assert torch.equal(layer(x), first)
    reset_dropout(layer)
    assert not torch.equal(layer(x), first)


def test_batch_change_resamples_eval_is_identity_and_edge_rates():
    layer = VariationalDropToken1d(0.5)
    assert layer(torch.ones(4, 3, 2)).shape == (4, 3, 2)
    assert layer(torch.ones(7, 3, 2)).shape == (7, 3, 2)  # TorchDEQ raises here
    layer.eval()
    x = torch.randn(2, 3, 2)
    assert torch.equal(layer(x), x)
    assert torch.equal(VariationalDropout(1.0)(x), torch.zeros_like(x))
    with pytest.raises(ValueError):
        VariationalDropout(1.5)


def test_dropout_inside_a_deq_keeps_a_fixed_point():
    from core.deq import get_deq, reset_deq

    torch.manual_seed(0)
    f_lin = torch.nn.Linear(8, 8)
    drop = VariationalDropout1d(0.5)
    model = torch.nn.ModuleList([f_lin, drop])
    x = torch.randn(3, 5, 8)
    deq = get_deq(f_max_iter=60, f_tol=1e-6)
    with torch.no_grad():
        f_lin.weight.mul_(0.3)

    def f(z):
        return drop(torch.tanh(f_lin(z))) + x

    reset_deq(model)
    _, info = deq(f, torch.zeros_like(x))
    assert info["abs_lowest"].max() < 1e-5  # a new mask per call would leave a residual ~1


@pytest.mark.gpu
def test_mask_on_cuda_half():
    layer = VariationalDropout2d(0.5)
    out = layer(torch.ones(2, 3, 4, 5, device="cuda", dtype=torch.float16))
    assert layer.mask.device.type == "cuda" and layer.mask.dtype == torch.float16 and out.is_cuda


def test_mixed_init_zeros_about_half_and_keeps_dtype():
    torch.manual_seed(0)
    z = mixed_init((100, 50), dtype=torch.float64)
    assert z.dtype == torch.float64 and z.shape == (100, 50)
    assert abs((z == 0).double().mean().item() - 0.5) < 0.03
    assert abs(z[z != 0].std().item() - 1.0) < 0.05
