"""`compile=default` (Run.wrap's torch.compile, inductor) trains MDEQ-digits like eager.

The compiled DEQ takes core's traceable solver path by itself; with deterministic=true
its first 20 losses equal the eager run's to 1e-4. Inductor compiles the forward and
backward graphs (and the evaluation graph) for minutes on 2 busy cores: slow.
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
def test_compiled_digits_run_has_the_eager_losses(tmp_path, monkeypatch):
    eager = _losses(tmp_path, monkeypatch, "none")
    compiled = _losses(tmp_path, monkeypatch, "default")
    assert len(eager) == len(compiled) == 20
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)
    assert eager[-1] < eager[0]  # it trains
