"""The Hydra presets in configs/deq/ compose at a project's `deq:` node, validate as a
DEQConfig, and build DEQs that find the fixed point of a linear contraction (and, with
IFT, its exact gradient)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from core.config import DEQConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Every preset file, the shared ones and each project's recipes (<project>_<recipe>.yaml).
PRESETS = sorted(p.stem for p in (CONFIGS / "deq").glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(overrides=list(overrides))


def test_every_preset_starts_from_the_default_preset():
    """(directly or through another preset), so that every option exists at deq: and
    `deq=<preset>` replaces a whole recipe."""
    assert {"default", "fp_pg", "anderson_ift", "broyden_ift", "unrolled", "fp_correction"} <= set(PRESETS)
    every_option = set(_compose("+deq=default").deq)
    for name in PRESETS:
        assert set(_compose(f"+deq={name}").deq) == every_option, \
            f"configs/deq/{name}.yaml must start from `defaults: [default, _self_]` (or another preset)"


def test_default_preset_is_every_option_with_torchdeq_defaults():
    node = _compose("+deq=default").deq
    assert sorted(node.keys()) == sorted(DEQConfig.option_names())
    assert DEQConfig.from_any(node) == DEQConfig()


@pytest.mark.parametrize("overrides,grad", [(("deq.grad=5",), 5), (("deq.grad=[5,3]",), [5, 3]),
                                            (("deq.indexing=[10,20]", "deq.sup_loc=[1]"), 5)])
def test_int_or_list_overrides_compose(overrides, grad):
    cfg = DEQConfig.from_any(_compose("+deq=fp_pg", *overrides).deq)
    assert cfg.grad == grad and cfg.grad_list() == ([grad] if isinstance(grad, int) else grad)


def test_misspelt_override_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose("+deq=fp_pg", "deq.f_max_iters=3")


D = 8


def _linear_problem():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, ord=2)  # a contraction
    x = torch.randn(4, D, generator=g, dtype=torch.float64, requires_grad=True)
    return A, x


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_a_working_deq(preset):
    from core.deq import get_deq

    node = _compose(f"+deq={preset}").deq
    cfg = DEQConfig.from_any(node)
    deq = get_deq(node)  # straight from the OmegaConf node
    A, x = _linear_problem()
    z_star = torch.linalg.solve(torch.eye(D, dtype=A.dtype) - A, x.detach().T).T

    def f(z):
        return z @ A.T + x

    deq.train()
    z_out, _ = deq(f, torch.zeros_like(x))
    assert len(z_out) == cfg.n_states
    short = cfg.f_solver == "fixed_point_iter" and cfg.tau == 1.0 and cfg.f_max_iter < 10
    if cfg.f_max_iter == 0:  # unrolled: grad steps of f from z_init, nothing else
        assert torch.allclose(z_out[-1], _iterate(A, x, cfg.grad_list()[-1]), atol=1e-10)
    elif short and cfg.n_states == 1:  # a short budget (DEQ-LM's 2 + 2): exactly that many steps
        assert torch.allclose(z_out[-1], _iterate(A, x, cfg.f_max_iter + cfg.grad_list()[-1]), atol=1e-10)
    else:
        assert torch.allclose(z_out[-1], z_star, atol=1e-3 * z_star.abs().max().item())
    probe = torch.randn_like(z_star)
    (grad,) = torch.autograd.grad((z_out[-1] * probe).sum(), x)
    if cfg.ift:  # dL/dx = (I - A)^-T dL/dz
        exact = torch.linalg.solve(torch.eye(D, dtype=A.dtype) - A.T, probe.T).T
        assert torch.allclose(grad, exact, atol=2e-3 * exact.abs().max().item())
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    deq.eval()
    with torch.no_grad():
        z_eval, info_eval = deq(f, torch.zeros_like(x))
    if cfg.f_solver == "fixed_point_iter" and cfg.eval_max_iter() < 10:
        # exactly the steps of f the solver took: the budget, or fewer where a sample reached
        # the tolerance first (deq_flow_synthetic's 9)
        nstep = torch.as_tensor(info_eval["nstep"]).flatten().long()
        assert int(nstep.max()) <= cfg.eval_max_iter()
        for k in nstep.unique().tolist():
            rows = nstep == k
            assert torch.allclose(z_eval[-1][rows], _iterate(A, x, k)[rows], atol=1e-10), k
    else:  # unrolled evaluates with eval_f_max_iter=12 steps: contraction 0.5 leaves < 0.5^11.
        assert torch.allclose(z_eval[-1], z_star, atol=1e-3 * z_star.abs().max().item())


def _iterate(A, x, steps):
    z = torch.zeros_like(x.detach())
    for _ in range(steps):
        z = z @ A.T + x.detach()
    return z
