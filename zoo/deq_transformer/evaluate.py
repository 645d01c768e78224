"""Evaluate a DEQ Transformer checkpoint: ``python -m zoo.deq_transformer.evaluate +experiment=<name> ckpt=<path>``.

``ckpt`` is a zoo checkpoint (file or run directory; its stored config builds the model)
or, with ``ckpt_format=torchdeq``, a state dict of the TorchDEQ zoo's deq-lm / deq-seq
(zoo.deq_transformer.convert maps its key names; name the experiment it belongs to).
Test-time options: ``deq.eval_f_max_iter`` (solver budget), ``model.mem_len`` or
``eval.mem_len`` (memory length, e.g. 480), ``eval.tgt_len`` (segment length),
``eval.batch_size`` and ``eval.split``. The split is read in order with the memory carried
across segments; ``<split>/ppl`` is exp of the token-weighted mean NLL. ``eval.sweep=true``
adds perplexity and residuals against solver iterations (``eval.sweep_iterations``;
``nfe_sweep.json``/``.png``, ``ppl_vs_iterations.png``) and against ``eval.sweep_mem_lens``;
``eval.baselines=true`` the unigram and Kneser-Ney bigram perplexity of the split.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from omegaconf import DictConfig

from zoo.common import evaluate_checkpoint, zoo_main
from zoo.deq_transformer.convert import load_torchdeq_checkpoint
from zoo.deq_transformer.data import build_datasets
from zoo.deq_transformer.train import build_model, evaluate_stream, test_time_report

TEST_TIME_KEYS = ("model.mem_len",)


def evaluate_model(model: torch.nn.Module, run) -> Dict[str, Any]:
    """Perplexity of ``run.cfg.eval.split`` and the test-time report (options from run.cfg)."""
    cfg = run.cfg
    corpus = build_datasets(cfg.data)
    split = str(cfg.eval.split)
    metrics, info = evaluate_stream(model, corpus.split(split), run.device, int(cfg.eval.batch_size),
                                    int(cfg.eval.tgt_len or cfg.train.tgt_len), cfg.eval.get("mem_len"),
                                    None, cfg.eval.get("max_segments"))
    out: Dict[str, Any] = {f"{split}/ppl": metrics["ppl"], f"{split}/nll": metrics["nll"], "deq_info": info}
    out.update(test_time_report(model, corpus, run, split))
    return out


def load_weights(model: torch.nn.Module, run) -> None:
    load_torchdeq_checkpoint(model, str(run.cfg.ckpt))


def evaluate(cfg: DictConfig) -> Dict[str, Any]:
    fmt = str(cfg.get("ckpt_format", "ours"))
    if fmt not in ("ours", "torchdeq"):
        raise ValueError(f"ckpt_format={fmt!r}: use ours or torchdeq")
    return evaluate_checkpoint(cfg, "deq_transformer", build_model, evaluate_model,
                               load_weights=load_weights if fmt == "torchdeq" else None,
                               test_time_keys=TEST_TIME_KEYS)


@zoo_main("deq_transformer")
def main(cfg: DictConfig) -> None:
    print(evaluate(cfg))


if __name__ == "__main__":
    main()
