"""The one road from a checkpoint to ``results.json``: `evaluate_checkpoint`.

An evaluation starts from the config stored with the checkpoint, so the model, the data
split and the seed are the ones the checkpoint was trained with, whatever experiment or
seed the command line names. The command line may change test-time options only
(`zoo.common.config_keys.TEST_TIME_KEYS`: ``deq.eval_*`` and the forward solver,
``eval.*``, ``data.root``, the evaluation batch size, device, threads, logging, plus a
project's own, e.g. ``model.mem_len``); an override that would change the model or the
data split is an error that says so. ``+experiment`` is optional; when given it must be
the checkpoint's. A checkpoint in another format (a TorchDEQ zoo state dict, read by a
project's ``load_weights``) carries no config: there the command line's config is used
as it is, and ``+experiment`` is required.

A project's ``evaluate.py``::

    def evaluate(model, run):                 # under no_grad, model in eval mode
        top1, info = test_top1(model, run.cfg)  # options from run.cfg, the effective config
        return {"test/top1": top1, "deq_info": info, "nfe_sweep": rows}

    @zoo_main("mdeq")
    def main(cfg):
        evaluate_checkpoint(cfg, "mdeq", build_model, evaluate)

Numbers in the returned dict are the metrics of ``results.json``, ``deq_info`` a DEQ
``info`` dict, anything else goes to its ``extra``.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.common.checkpoint import load_checkpoint
from zoo.common.config_keys import (TEST_TIME_KEYS, command_line_overrides, differences, flatten, matches,
                                    override_key)

LoadWeights = Callable[[torch.nn.Module, Any], None]


def command_line_keys(cfg: DictConfig) -> list[str] | None:
    """The config keys the command line overrode (``+experiment`` excluded), or None outside Hydra."""
    overrides = command_line_overrides(cfg)
    if overrides is None:
        return None
    keys = [override_key(o) for o in overrides]
    return [k for k in keys if k and k != "experiment" and not k.startswith("hydra")]


def _chosen_experiment(cfg: DictConfig) -> str | None:
    from zoo.common.run import experiment_name

    name = experiment_name(cfg)
    return None if name == "default" else name


def effective_config(cfg: DictConfig, stored: Mapping[str, Any], stored_experiment: str | None,
                     test_time_keys: Iterable[str] = ()) -> DictConfig:
    """The checkpoint's config with the command line's test-time overrides applied.

    Raises ValueError when the command line names another experiment or changes an
    option outside the test-time keys.
    """
    allowed = tuple(TEST_TIME_KEYS) + tuple(test_time_keys)
    chosen = _chosen_experiment(cfg)
    if chosen is not None and stored_experiment not in (None, chosen):
        raise ValueError(
            f"+experiment={chosen} but the checkpoint was trained as experiment {stored_experiment!r}: "
            f"drop +experiment (the checkpoint's config is used) or pass a checkpoint of {chosen}")
    given = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    keys = command_line_keys(cfg)
    if keys is None:  # no record of the command line: every difference counts as an override
        changed = differences(stored, given, ignore=())
    else:
        flat_given = flatten(given)
        changed = {}
        for key in keys:
            sub = {k: v for k, v in flat_given.items() if k == key or k.startswith(key + ".")}
            sub_stored = {k: v for k, v in flatten(stored).items() if k == key or k.startswith(key + ".")}
            changed.update(differences(sub_stored, sub, ignore=()))
    refused = {k: v for k, v in changed.items() if not matches(k, allowed)}
    if refused:
        shown = ", ".join(f"{k}={b!r} (trained with {a!r})" for k, (a, b) in list(refused.items())[:5])
        raise ValueError(
            f"these overrides would change the model or the data split of the checkpoint: {shown}. "
            "An evaluation may change test-time options only (deq.eval_*, the forward solver, eval.*, "
            "data.root, train.eval_batch_size, device, ...; zoo/common/config_keys.py)")
    effective = OmegaConf.create(stored)
    for key, (_, value) in changed.items():
        OmegaConf.update(effective, key, value, force_add=True, merge=False)
    # options added to the project since the checkpoint was written keep their defaults
    effective = OmegaConf.merge(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), effective)
    if "hydra" in cfg:
        with_hydra = OmegaConf.masked_copy(cfg, ["hydra"])
        effective = OmegaConf.merge(effective, with_hydra)
    return effective


def _experiment_dir(experiment: str | None) -> Path | None:
    """Without ``+experiment`` Hydra put the run under ``<project>/default/``: the run goes to
    ``<project>/<the checkpoint's experiment>/`` instead, with Hydra's ``.hydra/`` moved along."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    if experiment is None or not HydraConfig.initialized():
        return None
    made = Path(HydraConfig.get().runtime.output_dir)
    if made.parent.name != "default":
        return None
    target = made.parent.parent / experiment / made.name
    target.mkdir(parents=True, exist_ok=True)
    for item in made.iterdir():
        shutil.move(str(item), str(target / item.name))
    made.rmdir()
    if not any(made.parent.iterdir()):
        made.parent.rmdir()
    return target


def split_outputs(out: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics with ``deq_info``, extra) of what a project's ``evaluate`` returned."""
    metrics, extra = {}, {}
    for key, value in out.items():
        is_number = isinstance(value, numbers.Number) or (torch.is_tensor(value) and value.numel() == 1)
        if key == "deq_info" or is_number:
            metrics[key] = value.item() if torch.is_tensor(value) and key != "deq_info" else value
        else:
            extra[key] = value
    return metrics, extra


def evaluate_checkpoint(cfg: DictConfig, project: str, build_model: Callable[[DictConfig], torch.nn.Module],
                        evaluate: Callable[[torch.nn.Module, Any], Mapping[str, Any]],
                        load_weights: Optional[LoadWeights] = None,
                        test_time_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt`` and writes ``results.json`` (``status: evaluated``); returns the metrics.

    `build_model(cfg)` builds the model of the effective config; `evaluate(model, run)`
    runs in eval mode under ``torch.no_grad()`` and reads its options from ``run.cfg``.
    `load_weights(model, run)` loads a checkpoint of another format (no stored config);
    by default ``cfg.ckpt`` is a zoo checkpoint file or run directory. `test_time_keys`
    adds the project's own test-time options (patterns, as in `config_keys`).
    """
    from zoo.common.run import Run

    ckpt = cfg.get("ckpt")
    if ckpt in (None, ""):
        raise ValueError("ckpt is not set: pass ckpt=<checkpoint file or run directory>")
    state = None
    if load_weights is None:
        state = load_checkpoint(ckpt, map_location="cpu")
        if state.get("config") is None:
            raise ValueError(f"ckpt={ckpt} holds no config: is it a checkpoint of another format?")
        if state.get("project") not in (None, project):
            raise ValueError(f"ckpt={ckpt} is a checkpoint of project {state['project']!r}, not {project!r}")
        cfg = effective_config(cfg, state["config"], state.get("experiment"), test_time_keys)
        experiment = state.get("experiment")
    else:
        experiment = _chosen_experiment(cfg)
        if experiment is None:
            raise ValueError(f"ckpt={ckpt} carries no config: name the experiment it was trained with, "
                             "+experiment=<name>")
    with Run(cfg, project=project, mode="eval", experiment=experiment,
             out_dir=_experiment_dir(experiment)) as run:
        model = build_model(run.cfg).to(run.device)
        if state is not None:
            Run.unwrap(model).load_state_dict(state["model"])
        else:
            load_weights(model, run)
        model.eval()
        with torch.no_grad():
            metrics, extra = split_outputs(evaluate(model, run))
        run.write_results(metrics, checkpoint=str(Path(str(ckpt))), extra=extra or None)
        run.summary({k: v for k, v in metrics.items() if k != "deq_info"})
        return {k: v for k, v in metrics.items() if k != "deq_info"}
