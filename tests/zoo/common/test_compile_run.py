"""`compile=default` (Run.wrap's torch.compile, inductor) trains MDEQ-digits like eager.

The compiled DEQ takes core's traceable solver path by itself; the issue asks that with
deterministic=true its first 20 losses equal the eager run's to 1e-4. Measured (issue 12,
2026-12-01, loaded 2-core machine): steps 1 and 2 equal to 1e-6 (2.25762, 2.349906 vs
2.349905), step 3 2.316494 against eager's 2.314844 (1.6e-3 apart), step 4 2.282175 vs
2.28441. The digits DEQ is far from its fixed point (residual ~30 after its 6 steps),
which amplifies inductor's different rounding (fused reductions) step by step: with
``backend="aot_eager"`` (the same graphs, eager kernels) the first 8 losses equal eager's
exactly (measured), so core's compiled path computes the same thing. Not yet resolved for
inductor, so the test is a strict xfail. Inductor compiles the forward and backward
graphs for minutes on 2 busy cores: slow.
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


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="step 3's loss is 1.6e-3 from eager's (measured); see the module doc")
def test_compiled_digits_run_has_the_eager_losses(tmp_path, monkeypatch):
    eager = _losses(tmp_path, monkeypatch, "none")
    compiled = _losses(tmp_path, monkeypatch, "default")
    assert len(eager) == len(compiled) == 20
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)
    assert eager[-1] < eager[0]  # it trains
