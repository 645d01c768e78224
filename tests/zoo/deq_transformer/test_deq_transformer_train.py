"""DEQ Transformer experiments compose to the recipes, a missing corpus names the layout, a
short run on a WikiText fixture lowers the loss and writes the offline report, evaluate.py
applies test-time options, and TorchDEQ zoo state dicts load through convert.py."""
import json

import pytest
import torch

from zoo.common import MissingDataError, compose
from zoo.deq_transformer.convert import convert_state_dict, load_torchdeq_checkpoint
from zoo.deq_transformer.model import DEQTransformerLM
from zoo.deq_transformer.train import train

QUIET = ["logger.wandb.mode=disabled", "log.progress=false"]


@pytest.mark.parametrize("experiment,size,solver,ift,iters,grad,jac", [
    ("wt103_ift", "deq_seq", "broyden", True, 35, 1, 0.0),
    ("wt103_ift_jr", "deq_seq", "broyden", True, 35, 1, 0.1),
    ("wt103_final", "deq_lm", "fixed_point_iter", False, 0, 12, 0.0),
])
def test_experiments_carry_the_recipes(experiment, size, solver, ift, iters, grad, jac):
    cfg = compose("deq_transformer", [f"+experiment={experiment}"])
    d = cfg.deq
    assert (cfg.model.size, d.f_solver, d.ift, d.f_max_iter, d.grad, d.jac_loss_weight) == (
        size, solver, ift, iters, grad, jac)
    assert d.norm_type == "weight_norm" and d.f_stop_mode == "rel" and cfg.model.mem_len == 150
    assert cfg.train.tgt_len == 150 and cfg.optim.lr == 2.5e-4
    rows = cfg.reported if isinstance(cfg.reported, list) or "table" not in cfg.reported else [cfg.reported]
    assert rows[0]["table"] == "table1"
    if experiment == "wt103_final":
        assert d.eval_f_max_iter == 12 and cfg.model.mem_gc and rows[1]["table"] == "table8"
    if experiment == "wt103_ift_jr":
        assert (d.jac_loss_freq, d.jac_incremental) == (0.4, 30000)


def test_a_deq_preset_on_the_command_line_replaces_the_recipe():
    cfg = compose("deq_transformer", ["+experiment=wt103_ift_jr", "deq=deq_transformer_final", "deq.grad=6"])
    assert (cfg.deq.f_solver, cfg.deq.ift, cfg.deq.jac_loss_weight, cfg.deq.grad) == ("fixed_point_iter", False,
                                                                                       0.0, 6)


def test_wikitext103_without_data_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    cfg = compose("deq_transformer", ["+experiment=wt103_final", f"data.root={tmp_path}", *QUIET],
                  return_hydra_config=True)
    with pytest.raises(MissingDataError, match=r"wiki\.train\.tokens(.|\n)*wikitext-103-v1\.zip"):
        train(cfg)


def test_short_run_lowers_the_loss_and_evaluate_applies_test_time_options(wikitext, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    overrides = ["+experiment=wiki_mini", f"data.root={wikitext}", "model.size=micro", "model.cutoffs=[8,20]",
                 "model.mem_len=8", "train.steps=24", "train.batch_size=2", "train.tgt_len=8", "log.every=4",
                 "optim.lr=3e-3", "eval.batch_size=2", "eval.sweep_iterations=[1,4]", "eval.sweep_mem_lens=[0,8]",
                 "eval.generate_tokens=3", "eval.prompt_tokens=4", *QUIET]
    metrics = train(compose("deq_transformer", overrides, return_hydra_config=True))
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.3
    results = json.loads((run_dir / "results.json").read_text())
    m = results["metrics"]
    assert m["valid/ppl"] == pytest.approx(metrics["valid/ppl"]) and m["valid/kn_bigram_ppl"] < m["valid/unigram_ppl"]
    extra = results["extra"]
    assert [r["iterations"] for r in extra["nfe_sweep"]] == [1, 4]
    assert [r["mem_len"] for r in extra["mem_len_sweep"]] == [0, 8]
    assert len(extra["continuation"].split("||")[1].split()) == 3
    assert (run_dir / "ppl_vs_iterations.png").stat().st_size > 0 and (run_dir / "nfe_sweep.json").is_file()

    from zoo.deq_transformer.evaluate import evaluate

    cfg = compose("deq_transformer", [f"ckpt={run_dir}", "deq.eval_f_max_iter=3", "model.mem_len=2",
                                      "eval.split=test", *QUIET], return_hydra_config=True)
    ev = evaluate(cfg)
    evaluated = [r for r in (json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("results.json"))
                 if r["status"] == "evaluated"]
    assert len(evaluated) == 1 and evaluated[0]["deq"]["deq/nfe"] == 3
    from omegaconf import OmegaConf

    used = OmegaConf.load(evaluated[0]["config_path"])
    assert used.model.mem_len == 2 and used.model.size == "micro" and used.deq.eval_f_max_iter == 3
    evaluated = evaluated[0]
    assert ev["test/ppl"] == pytest.approx(evaluated["metrics"]["test/ppl"]) and ev["test/ppl"] > 1


def torchdeq_deq_lm_layout(n_token, cutoffs, d, n_head, d_head, d_inner, n_layer, div_val):
    """Key -> shape of a TorchDEQ zoo deq-lm state dict, written from its module structure
    (AdaptiveEmbedding, injection, func.dec_attn/pos_ff ModuleLists with weight norm,
    ProjectedAdaptiveLogSoftmax), with DDP's `module.` prefix."""
    bounds = [0, *cutoffs, n_token]
    dims = [d // div_val ** i for i in range(len(bounds) - 1)]
    hd = n_head * d_head
    keys = {"pos_emb.inv_freq": (d // 2,), "injection.weight": (3 * hd, d), "injection.bias": (3 * hd,),
            "crit.cluster_weight": (len(cutoffs), d), "crit.cluster_bias": (len(cutoffs),)}
    for i, di in enumerate(dims):
        keys.update({f"word_emb.emb_layers.{i}.weight": (bounds[i + 1] - bounds[i], di),
                     f"word_emb.emb_projs.{i}.weight": (d, di),
                     f"crit.out_layers.{i}.weight": (bounds[i + 1] - bounds[i], di),
                     f"crit.out_layers.{i}.bias": (bounds[i + 1] - bounds[i],),
                     f"crit.out_projs.{i}.weight": (d, di)})
    for b in range(n_layer):
        a, f = f"func.dec_attn.{b}", f"func.pos_ff.{b}"
        for name, out_, in_ in (("qkv_net", 3 * hd, d), ("r_net", hd, d), ("o_net", d, hd)):
            keys.update({f"{a}.{name}.weight_g": (out_, 1), f"{a}.{name}.weight_v": (out_, in_)})
        keys.update({f"{a}.o_net.bias": (d,), f"{a}.r_w_bias": (n_head, d_head), f"{a}.r_r_bias": (n_head, d_head),
                     f"{a}.ln1.weight": (d,), f"{a}.ln1.bias": (d,), f"{a}.ln2.weight": (d,), f"{a}.ln2.bias": (d,),
                     f"{f}.ff1_net.weight_g": (d_inner, 1), f"{f}.ff1_net.weight_v": (d_inner, d),
                     f"{f}.ff1_net.bias": (d_inner,), f"{f}.ff2_net.weight_g": (d, 1),
                     f"{f}.ff2_net.weight_v": (d, d_inner), f"{f}.ff2_net.bias": (d,),
                     f"{f}.ln.weight": (d,), f"{f}.ln.bias": (d,)})
    return {f"module.{k}": v for k, v in keys.items()}


def _fixture_state(layout):
    torch.manual_seed(3)
    state = {k: torch.randn(shape) for k, shape in layout.items()}
    for k in list(state):   # upstream saves the tied copies with equal values
        if ".crit.out_layers." in k and k.endswith("weight"):
            state[k] = state[k.replace("crit.out_layers", "word_emb.emb_layers")]
        if ".crit.out_projs." in k and not k.endswith("0.weight"):
            state[k] = state[k.replace("crit.out_projs", "word_emb.emb_projs")]
    return state


def test_torchdeq_deq_lm_state_dict_loads_and_drives_the_model(tmp_path):
    layout = torchdeq_deq_lm_layout(60, [10, 30], 32, 2, 16, 64, 2, 2)
    state = _fixture_state(layout)
    path = tmp_path / "model.pth"
    torch.save(state, path)
    from dataclasses import replace

    from zoo.deq_transformer.model import SIZES

    model = DEQTransformerLM(replace(SIZES["micro"], n_layer=2), 60, [10, 30], deq={"f_max_iter": 2}, dropout=0.0)
    load_torchdeq_checkpoint(model, path)
    assert torch.equal(model.func.pos_ff[1].ff2_net.weight_v, state["module.func.pos_ff.1.ff2_net.weight_v"])
    assert torch.equal(model.crit.out_layers[2].weight, state["module.word_emb.emb_layers.2.weight"])
    assert torch.equal(model.crit.out_projs[0].weight, state["module.crit.out_projs.0.weight"])
    with torch.no_grad():
        nlls, _, _ = model.eval()(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    assert torch.isfinite(nlls[-1]).all()
    broken = dict(state)
    broken["module.crit.out_projs.1.weight"] = broken["module.crit.out_projs.1.weight"] + 1
    with pytest.raises(ValueError, match="out_projs.1.weight differs"):
        convert_state_dict(broken, model)
    with pytest.raises(ValueError, match="missing: .*r_w_bias"):
        convert_state_dict({k: v for k, v in state.items() if "r_w_bias" not in k}, model)


def test_deq_seq_single_block_names_and_plain_weights_convert(tmp_path):
    from dataclasses import replace

    from zoo.deq_transformer.model import SIZES

    size = replace(SIZES["micro"], variant="seq", pre_lnorm=False)
    model = DEQTransformerLM(size, 60, [10, 30], deq={"f_max_iter": 2}, dropout=0.0)
    ours = model.state_dict()
    upstream = {}
    for k, v in ours.items():
        k2 = k.replace("func.dec_attn.0.", "func.dec_attn.").replace("func.pos_ff.0.", "func.pos_ff.")
        upstream[k2] = torch.randn_like(v)
    # an unnormalised qkv weight (W_eff itself) instead of weight_g / weight_v
    weight = torch.randn_like(ours["func.dec_attn.0.qkv_net.weight_v"])
    del upstream["func.dec_attn.qkv_net.weight_g"], upstream["func.dec_attn.qkv_net.weight_v"]
    upstream["func.dec_attn.qkv_net.weight"] = weight
    for i in range(3):
        upstream[f"crit.out_layers.{i}.weight"] = upstream[f"word_emb.emb_layers.{i}.weight"]
        if i:
            upstream[f"crit.out_projs.{i}.weight"] = upstream[f"word_emb.emb_projs.{i}.weight"]
    assert upstream["inject_conv.weight"].shape == (96, 32, 1)
    model.load_state_dict(convert_state_dict(upstream, model))
    from core.norm import reset_norm

    reset_norm(model.func)
    assert torch.allclose(model.func.dec_attn[0].qkv_net.weight, weight, atol=1e-6)
