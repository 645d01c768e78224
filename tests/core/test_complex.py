"""Complex states (complex64 / complex128, as in MRI reconstruction DEQs).

Fixed-point iteration and Anderson solve them (Anderson with the Hermitian Gram matrix
G_ij = g_i^H g_j: without the conjugate its weights are wrong and it stalls); Broyden
raises an error naming the solvers that can.
"""
import pytest
import torch

from core import get_deq
from core.solvers import anderson, broyden, fixed_point_iter, simple_fixed_point_iter


def _affine(dtype, batch=4, dim=12, radius=0.9, seed=0):
    """f(z) = A z + c per sample, complex A with spectral radius `radius`; and z*."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    a = torch.complex(torch.randn(dim, dim, generator=gen, dtype=torch.float64),
                      torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a = radius * a / torch.linalg.eigvals(a).abs().max()
    c = torch.complex(torch.randn(batch, dim, generator=gen, dtype=torch.float64),
                      torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    z_star = torch.linalg.solve(torch.eye(dim, dtype=a.dtype) - a, c.T).T
    a, c = a.to(dtype), c.to(dtype)
    assert real.is_floating_point
    return (lambda z: z @ a.T + c), z_star


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("solver", [fixed_point_iter, anderson], ids=lambda s: s.__name__)
def test_complex_fixed_point_is_found(solver, dtype):
    func, z_star = _affine(dtype)
    tol = 1e-4 if dtype == torch.complex64 else 1e-10
    z, _, info = solver(func, torch.zeros(4, 12, dtype=dtype), max_iter=400, tol=tol)
    assert z.dtype == dtype
    err = (z.to(torch.complex128) - z_star).abs().max()
    assert err < (1e-3 if dtype == torch.complex64 else 1e-8), err
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep"):
        assert info[key].dtype == real, key
    assert (info["abs_lowest"] < tol).all()


def test_complex_anderson_uses_the_hermitian_gram_matrix():
    # Anderson on an affine map finds z* in about dim steps; fixed-point iteration at
    # spectral radius 0.9 needs hundreds. A Gram matrix without the conjugate is not the
    # least-squares system, and Anderson then needs about as many steps as plain iteration.
    func, z_star = _affine(torch.complex128, radius=0.9)
    x0 = torch.zeros(4, 12, dtype=torch.complex128)
    _, _, fast = anderson(func, x0, max_iter=400, tol=1e-9, m=12, lam=0.0)
    _, _, slow = fixed_point_iter(func, x0, max_iter=400, tol=1e-9)
    assert fast["nstep"].max() <= 30 < slow["nstep"].min()


def test_complex_anderson_sync_free_equals_eager():
    func, _ = _affine(torch.complex64)
    x0 = torch.zeros(4, 12, dtype=torch.complex64)
    eager = anderson(func, x0, max_iter=25, tol=1e-5)
    free = anderson(func, x0, max_iter=25, tol=1e-5, sync_free=True)
    assert (eager[0] - free[0]).abs().max() < 1e-5
    assert torch.allclose(eager[2]["abs_lowest"], free[2]["abs_lowest"], rtol=1e-3, atol=1e-6)


def test_simple_fixed_point_iter_takes_complex_states():
    func, z_star = _affine(torch.complex128, radius=0.5)
    z, _, info = simple_fixed_point_iter(func, torch.zeros(4, 12, dtype=torch.complex128),
                                         max_iter=80)
    assert (z - z_star).abs().max() < 1e-12 and info["abs_lowest"].dtype == torch.float64


def test_broyden_rejects_complex_states_naming_the_solvers_that_take_them():
    func, _ = _affine(torch.complex64)
    with pytest.raises(ValueError, match="broyden does not solve complex.*fixed_point_iter.*anderson"):
        broyden(func, torch.zeros(4, 12, dtype=torch.complex64))


def test_complex_deq_forward():
    func, z_star = _affine(torch.complex128)
    deq = get_deq(f_solver="anderson", f_max_iter=60, f_tol=1e-10).eval()
    z_out, info = deq(func, torch.zeros(4, 12, dtype=torch.complex128))
    assert (z_out[-1] - z_star).abs().max() < 1e-8
    assert info["abs_lowest"].dtype == torch.float64
