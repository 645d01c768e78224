"""TorchDEQ's documented command lines parse, through add_deq_args, to the expected DEQConfig
(every other option at its default), exactly as TorchDEQ's own parser reads them."""
import argparse

import pytest
from torch import nn

from core.config import DEQConfig, add_deq_args
from core.norm import SpectralNorm, apply_norm

LINES = [
    ("--ift --f_solver anderson --b_solver broyden", dict(ift=True, f_solver="anderson", b_solver="broyden")),
    ("--f_max_iter 0 --grad 12 --tau 1.0", dict(f_max_iter=0, grad=12, tau=1.0)),
    ("--n_states 2", dict(n_states=2)),
    ("--indexing 20 30", dict(indexing=[20, 30])),
    ("--norm_type spectral_norm --norm_clip --norm_clip_value 0.99",
     dict(norm_type="spectral_norm", norm_clip=True, norm_clip_value=0.99)),
    ("--b_max_iter 30 --b_tol 0.001", dict(b_max_iter=30, b_tol=0.001)),
    ("--grad 5 3", dict(grad=[5, 3])),
]


def _parse(line, add=add_deq_args):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1e-3)  # a program's own flag, ignored
    add(parser)
    return parser.parse_args(line.split())


@pytest.mark.parametrize("line,changed", LINES)
def test_command_line_gives_expected_config(line, changed):
    cfg = DEQConfig.from_any(_parse(line))
    assert cfg == DEQConfig(**changed)


@pytest.mark.parametrize("line,changed", LINES)
def test_flags_match_torchdeq_parser(line, changed):
    torchdeq = pytest.importorskip("torchdeq")
    ours, theirs = vars(_parse(line)), vars(_parse(line, torchdeq.add_deq_args))
    assert {k: ours[k] for k in theirs} == theirs


def test_norm_flags_reach_apply_norm():
    layer = nn.Linear(4, 4)
    apply_norm(layer, args=_parse("--norm_type spectral_norm --norm_clip --norm_clip_value 0.99"))
    fn = layer._deq_norm
    assert isinstance(fn, SpectralNorm) and fn.clip and fn.clip_value == 0.99 and fn.learn_scale


def test_deq_flags_reach_get_deq():
    from core.deq import get_deq

    deq = get_deq(_parse("--b_max_iter 30 --b_tol 0.001 --f_max_iter 0 --grad 12 --tau 1.0"))
    cfg = deq.args  # TorchDEQ's attribute name for the module's config
    assert (cfg.get("b_max_iter"), cfg.get("b_tol"), cfg.get("f_max_iter"), cfg.get("grad")) == (30, 0.001, 0, 12)
