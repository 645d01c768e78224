"""`compile=default` (Run.wrap's torch.compile, inductor) trains MDEQ-digits like eager.

The compiled DEQ takes core's traceable solver path by itself; the issue asks that with
deterministic=true its first 20 losses equal the eager run's to 1e-4. Measured (issue 12,
2026-12-01, loaded 2-core machine): steps 1 and 2 equal to 1e-6 (2.25762, 2.349906 vs
2.349905), step 3 2.316494 against eager's 2.314844 (1.6e-3 apart), step 4 2.282175 vs
2.28441. The recipe amplifies inductor's different rounding (fused reductions) step by
step (what amplifies: the last paragraph): with
``backend="aot_eager"`` (the same graphs, eager kernels) the first 8 losses equal eager's
exactly (measured), so core's compiled path computes the same thing.

Why inductor cannot meet 1e-4 here: the digits recipe's first steps are chaotic in
eager mode too. `test_digits_training_amplifies_a_one_ulp_change_past_1e_4` perturbs the
initial parameters by a relative 1e-7 (one or two float32 ulps) and trains eager: the
losses part by more than 1e-4 within a few steps. Measured 2026-12-02 (8 fixed batches,
Adam 3e-3, loss differences at steps 1-8): eager with 1e-7 noise 0, 2.5e-4, 3.6e-3,
2.1e-3, 1.4e-2, ...; inductor 0, 3.1e-6, 4.0e-4, 2.4e-3, 2.3e-3, ... (SGD alike). At step
1 the inductor gradients equal eager's to 1e-5 (relative), except two biases before a
norm whose true gradient is 0 (|g| ~ 1e-8, rounding noise). So the inductor test stays a
strict xfail: its 1e-4 over 20 steps holds for no change of rounding, not only for
compile's. Inductor compiles the forward and backward graphs for minutes on 2 busy
cores: slow.

What amplifies (measured 2026-12-02, eager, after 2 SGD steps at lr 0.1): raising one
weight by one ulp leaves the loss equal and moves the logits by ~1e-6, yet every
parameter's gradient by 3.6e-3 (relative, the median over the tensors), the same 3.6e-3
for a relative change of 1e-8 to 3e-7 of all weights: a jump, not a slope. Backward
hooks place it at one ReLU of the head (`incre[1]`'s `relu(bn1(conv1(z)))`): one of its
16K inputs changes sign (|x| < 1.4e-5), which changes that tensor's gradient by 7e-3, and
the head's train-mode BatchNorms carry the change to every sample and every weight
before the DEQ. The next step's weights then differ by lr x 3.6e-3 x |g|, far more than
one ulp, and flip further ReLUs. Without the lowest-residual pick
(`+deq.f_solver_kwargs={return_final:true}`) the first gaps fall from 2.5e-4 to 2.4e-7,
but they pass 1e-4 by step 5 all the same.
"""
import json

import pytest

from zoo.common import compose
from zoo.mdeq.train import train

QUIET = ["logger.wandb.mode=disabled", "log.progress=false"]


def _losses(tmp_path, monkeypatch, mode):
    out = tmp_path / mode
    monkeypatch.setenv("ZOO_OUTPUTS", str(out))
    monkeypatch.chdir(tmp_path)
    cfg = compose("mdeq", ["+experiment=digits", "train.steps=20", "log.every=1",
                           "deterministic=true", "eval.sweep=false", "train.cpu_threads=1",
                           f"compile={mode}", *QUIET], return_hydra_config=True)
    train(cfg)
    lines = next(out.rglob("metrics.jsonl")).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["train/loss"] for r in records if "train/loss" in r]


def test_digits_training_amplifies_a_one_ulp_change_past_1e_4():
    """Eager against eager with the initial parameters x (1 + 1e-7 noise): the same batches,
    Adam at the recipe's 3e-3; the first loss agrees to 1e-6, a later one parts by > 1e-4."""
    import copy

    import torch

    from zoo.mdeq.data import build_datasets
    from zoo.mdeq.train import build_model, classification_loss

    cfg = compose("mdeq", ["+experiment=digits"])
    splits = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg, splits).train()
    items = [splits.train[i] for i in range(6 * 64)]
    xs = torch.stack([x for x, _ in items]).view(6, 64, *items[0][0].shape)
    ys = torch.tensor([int(y) for _, y in items]).view(6, 64)

    def losses(noise):
        m = copy.deepcopy(model)
        if noise:
            gen = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1 + noise * torch.randn(p.shape, generator=gen))
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        out = []
        for x, y in zip(xs, ys):
            opt.zero_grad()
            loss = classification_loss(m(x)[0], y, 0.8)
            loss.backward()
            opt.step()
            out.append(float(loss))
        return out

    base, nudged = losses(0.0), losses(1e-7)
    gaps = [abs(a - b) for a, b in zip(base, nudged)]
    assert gaps[0] < 1e-6 and max(gaps) > 1e-4, gaps


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="step 3's loss is 1.6e-3 from eager's (measured): the recipe amplifies "
                                       "any change of rounding, see the module doc")
def test_compiled_digits_run_has_the_eager_losses(tmp_path, monkeypatch):
    eager = _losses(tmp_path, monkeypatch, "none")
    compiled = _losses(tmp_path, monkeypatch, "default")
    assert len(eager) == len(compiled) == 20
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)
    assert eager[-1] < eager[0]  # it trains
