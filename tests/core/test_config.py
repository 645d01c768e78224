"""DEQConfig reads any config type, keeps TorchDEQ's defaults, and rejects bad options."""
import argparse

import pytest
from omegaconf import OmegaConf

from core import get_deq
from core.config import DEQConfig, add_deq_args


def test_defaults_are_torchdeq_defaults():
    c = DEQConfig.from_any()
    assert (c.core, c.f_solver, c.b_solver) == ("sliced", "fixed_point_iter", "fixed_point_iter")
    assert (c.f_max_iter, c.b_max_iter, c.f_tol, c.b_tol) == (40, 40, 1e-3, 1e-6)
    assert (c.grad, c.tau, c.n_states, c.ift, c.norm_type) == (1, 1.0, 1, False, "weight_norm")
    assert c.eval_max_iter() == 40


def test_program_namespace_other_keys_ignored_deq_keys_read():
    parser = add_deq_args(argparse.ArgumentParser())
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args("--lr 3 --f_max_iter 12 --eval_factor 1.5 --grad 5 3".split())
    c = DEQConfig.from_any(args)
    assert c.f_max_iter == 12 and c.grad == [5, 3] and c.eval_max_iter() == 18
    assert c.indexing is None and c.sup_loc is None  # argparse's [] means "not given"


@pytest.mark.parametrize("key,right", [("stop_mode", "f_stop_mode"), ("f_max_iters", "f_max_iter"),
                                       ("f_thres", "f_max_iter"), ("norm_clip_val", "norm_clip_value")])
def test_misspelt_option_names_the_right_one(key, right):
    with pytest.raises(ValueError, match=right):
        DEQConfig.from_any({key: 1})


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError, match="f_max_iter"):
        DEQConfig.from_any(None, f_max_iters=3)


@pytest.mark.parametrize("kw,option", [(dict(f_tol=-1.0), "f_tol"), (dict(core="dense"), "core"),
                                       (dict(f_stop_mode="max"), "f_stop_mode"), (dict(grad=[]), "grad"),
                                       (dict(n_states=0), "n_states"), (dict(tau=0.0), "tau"),
                                       (dict(indexing=[3, -1]), "indexing"), (dict(norm_type="bn"), "norm_type")])
def test_bad_values_name_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        DEQConfig.from_any(None, **kw)


def test_omegaconf_node_and_structured_overrides():
    schema = OmegaConf.structured(DEQConfig)
    for dotlist, expected in ((["grad=5"], 5), (["grad=[5,3]"], [5, 3])):
        node = OmegaConf.merge(schema, OmegaConf.from_dotlist(dotlist))
        assert DEQConfig.from_any(node).grad == expected
    with pytest.raises(Exception, match="f_max_iter"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["f_max_iter=many"]))


def test_get_and_update_like_torchdeq_wrapper():
    c = DEQConfig()
    assert c.get("f_solver") == "fixed_point_iter" and c.get("missing", 7) == 7
    c.update(f_solver="anderson", f_max_iter=30)
    assert (c.f_solver, c.f_max_iter) == ("anderson", 30)


@pytest.mark.parametrize("spelling, expected", [
    ("true", True), ("false", False), ("yes", True), ("no", False), ("on", True), ("off", False),
    ("1", True), ("0", False), ("False", False), (1, True), (0, False), (True, True), (False, False)])
def test_boolean_options_read_their_words(spelling, expected):
    assert DEQConfig.from_any({"ift": spelling}).ift is expected
    assert DEQConfig.from_any(norm_clip=spelling).norm_clip is expected
    assert get_deq(ift=spelling).args.ift is expected


@pytest.mark.parametrize("value", ["maybe", "2", 2, 0.5, "tru"])
def test_a_boolean_option_refuses_other_values_naming_the_option(value):
    with pytest.raises(ValueError, match=r"deq\.ift="):
        DEQConfig.from_any(ift=value)
