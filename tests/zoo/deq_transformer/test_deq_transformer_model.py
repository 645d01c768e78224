"""The DEQ Transformer: causality with memory, the adaptive softmax against dense
computations, the parameter counts of the paper sizes, and one training step per mode."""
import pytest
import torch
import torch.nn.functional as F

from core.reg.jacobian import jac_loss
from zoo.deq_transformer.model import (SIZES, WT103_CUTOFFS, WT103_VOCAB, AdaptiveLogSoftmax, DEQTransformerLM,
                                       count_parameters, reference_count, rel_shift)
from zoo.deq_transformer.train import lm_loss

# A fixed number of plain iterations returning the last state: exactly causal. (Returning the
# lowest-residual iterate picks one step for a whole sample, which future tokens influence.)
FIXED_6 = {"f_solver": "fixed_point_iter", "f_max_iter": 6, "f_tol": 1e-12, "eval_f_max_iter": 6,
           "f_solver_kwargs": {"return_final": True}}


def micro(deq=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("init_std", 0.3)   # large weights: every position visibly moves every other one
    return DEQTransformerLM(kw.pop("size", "micro"), 50, [10, 30], deq=deq or FIXED_6, dropout=kw.pop("dropout", 0.0),
                            mem_len=kw.pop("mem_len", 5), **kw)


def test_rel_shift_aligns_scores_with_distances():
    raw = torch.randn(2, 3, 4, 7)
    shifted = rel_shift(raw)
    m = 7 - 4
    for i in range(4):
        for j in range(m + i + 1):
            assert torch.equal(shifted[..., i, j], raw[..., i, 7 - 1 - (m + i - j)])


@torch.no_grad()
def test_fixed_point_model_is_causal_and_reads_its_memory():
    model = micro().eval()
    x = torch.randint(0, 50, (2, 10))
    _, mems, _ = model(x[:, :4])
    base, _, _ = model(x[:, 4:], mems=mems)
    future = x.clone()
    future[:, 7] = (future[:, 7] + 1) % 50
    changed, _, _ = model(future[:, 4:], mems=mems)
    diff = (base[-1] - changed[-1]).abs().amax(dim=(0, 2))
    assert torch.all(diff[:3] == 0) and torch.all(diff[3:] > 1e-4)
    past = x.clone()
    past[:, 1] = (past[:, 1] + 1) % 50
    _, other_mems, _ = model(past[:, :4])
    from_other, _, _ = model(x[:, 4:], mems=other_mems)
    assert (from_other[-1] - base[-1]).abs().amax() > 1e-4       # the memory reaches the segment
    assert mems[0].shape == (2, 4, 32) and mems[1].shape == (2, 4, 96)
    _, longer, _ = model(x[:, 4:], mems=mems, mem_len=8)
    assert longer[0].shape[1] == 8 and model(x[:, 4:], mems=mems)[1][0].shape[1] == 5


@torch.no_grad()
def test_adaptive_log_softmax_is_normalised_and_matches_a_dense_two_level_softmax():
    torch.manual_seed(1)
    crit = AdaptiveLogSoftmax(40, 16, 12, [8, 20], div_val=2)
    for p in crit.parameters():
        p.normal_()
    h = torch.randn(30, 12)
    lp = crit.log_prob(h)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(30), atol=1e-5)
    target = torch.arange(30) % 40 + torch.tensor([0, 10]).repeat(15)
    target = target.clamp(max=39)
    assert torch.allclose(crit(h, target), -lp.gather(1, target[:, None]).squeeze(1), atol=1e-5)
    # dense: head over [8 shortlist words, cluster 2, cluster 1], tails within each cluster
    head = F.log_softmax(h @ crit.out_projs[0].weight @ torch.cat([crit.out_layers[0].weight, crit.cluster_weight]).T
                         + torch.cat([crit.out_layers[0].bias, crit.cluster_bias]), -1)
    tails = [F.log_softmax(h @ crit.out_projs[i].weight @ crit.out_layers[i].weight.T + crit.out_layers[i].bias, -1)
             for i in (1, 2)]
    dense = torch.cat([head[:, :8], tails[0] + head[:, 9:10], tails[1] + head[:, 8:9]], dim=1)
    assert torch.allclose(lp, dense, atol=1e-5)


@torch.no_grad()
def test_without_clusters_it_is_the_dense_softmax():
    crit = AdaptiveLogSoftmax(25, 8, 8, [], div_val=1)
    for p in crit.parameters():
        p.normal_()
    h, y = torch.randn(6, 8), torch.randint(0, 25, (6,))
    dense = F.cross_entropy(h @ crit.out_projs[0].weight @ crit.out_layers[0].weight.T + crit.out_layers[0].bias, y,
                            reduction="none")
    assert torch.allclose(crit(h, y), dense, atol=1e-5)


def test_paper_size_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        model = DEQTransformerLM("deq_lm", WT103_VOCAB, WT103_CUTOFFS, deq={"norm_type": "weight_norm"})
    assert count_parameters(model) == 97_571_288
    assert reference_count(model) == 97_730_888                   # TorchDEQ zoo README: 98M (computed 97.73M)
    assert count_parameters(model.func) == 69_632_400              # f_theta 69.6M
    assert model.crit.out_layers[3].weight is model.word_emb.emb_layers[3].weight
    assert model.word_emb.emb_layers[2].weight.shape == (160000, 43)
    with torch.device("meta"):
        seq = DEQTransformerLM("deq_seq", WT103_VOCAB, WT103_CUTOFFS, deq={"norm_type": "weight_norm"})
    assert count_parameters(seq.func) == 69_753_000 and round(reference_count(seq) / 1e6) == 98   # deq-seq: 98M
    assert seq.inject_conv.weight.shape == (2100, 700, 1)


def _step(model, deq_cfg=None, step=0):
    x = (torch.arange(12).view(2, 6) * 7) % model.n_token             # tokens of every cluster
    y = (x * 3 + 1) % model.n_token
    model.train()
    _, mems, _ = model(x, y)                                       # a first segment fills the memory
    nlls, _, info = model(x, y, mems)
    loss = lm_loss(nlls, 0.8)
    if deq_cfg is not None:
        f, z = model.last_equilibrium()
        loss = loss + jac_loss(deq_cfg, f, z, step=step)
    model.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    return loss, info


FINAL = {"f_solver": "fixed_point_iter", "f_max_iter": 0, "grad": 3, "tau": 1.0, "eval_f_max_iter": 3}
IFT = {"f_solver": "broyden", "b_solver": "broyden", "f_max_iter": 4, "b_max_iter": 4, "ift": True,
       "f_stop_mode": "rel", "b_stop_mode": "rel", "f_tol": 1e-3, "b_tol": 1e-3}
JR = {**IFT, "jac_loss_weight": 0.5, "jac_loss_freq": 1.0}


@pytest.mark.parametrize("deq,variant,mem_gc", [(FINAL, "lm", True), (IFT, "seq", False), (JR, "seq", False)],
                         ids=["final_unrolled_mem_gc", "ift_broyden", "ift_jr"])
def test_one_training_step_of_each_mode_has_gradients_everywhere(deq, variant, mem_gc):
    from dataclasses import replace

    size = replace(SIZES["micro"], variant=variant, pre_lnorm=False) if variant == "seq" else "micro"
    model = micro(deq, size=size, mem_gc=mem_gc, dropout=0.1, init_std=0.05)
    _, info = _step(model, deq if deq is JR else None)
    assert float(info["nstep"].float().mean()) >= (1 if deq is not FINAL else 0)


def test_mem_gc_gives_the_gradients_of_the_plain_graph():
    grads = []
    for mem_gc in (False, True):
        model = micro(FINAL, mem_gc=mem_gc, init_std=0.05)
        torch.manual_seed(5)
        _step(model)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("size,deq", [("deq_lm", {**FINAL, "grad": 2}), ("deq_seq", {**IFT, "f_max_iter": 2,
                                                                                      "b_max_iter": 2})])
def test_paper_size_training_step(size, deq):
    torch.manual_seed(0)
    model = DEQTransformerLM(size, 64, [16, 32, 48], deq=deq, mem_len=4, mem_gc=size == "deq_lm")
    _step(model)
