"""DEQ-DDIM runs: ``python -m zoo.deq_ddim.train +experiment=<name> [overrides]``.

``task`` (set by each experiment) says what the run does:

- ``ddpm`` (`digits_ddpm`): trains the small diffusion UNet on the digits (DDPM noise
  loss, through `Run.fit`, resumable) and saves it to ``denoiser.ckpt``;
- ``sampling`` (`digits_sampling`): the DEQ sampler against sequential DDIM
  (`zoo.deq_ddim.experiments.sampling_study`), ``trajectory.png``;
- ``inversion`` (`digits_inversion`, `cifar10_inversion`): x_T optimised through the DEQ
  (phantom gradient) against backpropagation through the sequential sampler
  (`zoo.deq_ddim.experiments.inversion_study`), ``inversion.png``.

The sampling and inversion runs load the denoiser from ``denoiser.ckpt``; on the digits a
missing file is trained first, inside the run, under a file lock (``<ckpt>.lock``) so that
parallel sweep jobs train it once and the others wait for it.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import TensorDataset

from zoo.common import Run, build_optimizer, build_scheduler, load_checkpoint, save_checkpoint, zoo_main
from zoo.deq_ddim import experiments
from zoo.deq_ddim.convert import load_ddpm_checkpoint
from zoo.deq_ddim.data import build_datasets
from zoo.deq_ddim.diffusion import DTYPES, Schedule, ddpm_loss
from zoo.deq_ddim.model import DiffusionUNet, count_parameters, get_size

SIZE_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_groups")
TASKS = ("ddpm", "sampling", "inversion")


def build_model(cfg: DictConfig) -> DiffusionUNet:
    """The denoiser UNet of ``cfg.model`` (a named size, fields optionally overridden)."""
    m = cfg.model
    return DiffusionUNet(get_size(str(m.size), **{k: m.get(k) for k in SIZE_FIELDS}))


def optimizer_options(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if v is not None}


def train_denoiser(cfg: DictConfig, run: Run) -> tuple[DiffusionUNet, dict]:
    """DDPM training of the denoiser on ``data``'s training images through `run.fit`;
    saves it to ``denoiser.ckpt``; returns it with the final metrics."""
    splits = build_datasets(cfg.data)
    model = run.wrap(build_model(cfg))
    optimizer = build_optimizer(model, optimizer_options(cfg))
    steps = int(cfg.train.steps)
    scheduler = build_scheduler(optimizer, cfg.sched, steps)
    schedule = Schedule.from_config(cfg)
    batches = run.loader(TensorDataset(splits.train), batch_size=int(cfg.train.batch_size), shuffle=True,
                         drop_last=True)

    def train_step(batch, step):
        (x0,) = batch
        with run.autocast():
            loss = ddpm_loss(model, schedule, x0.to(run.device))
        run.backward_step(loss, optimizer, model.parameters(), cfg.clip, scheduler)
        return {"train/loss": loss.detach()}

    def evaluate(step):  # the noise loss on the held-out digits at fixed (t, noise)
        held = splits.heldout.to(run.device)
        gen = torch.Generator().manual_seed(1234)
        return {"heldout/loss": float(ddpm_loss(model, schedule, held, generator=gen))} if len(held) else {}

    out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                  batches=batches, total_steps=steps, evaluate=evaluate, eval_every=int(cfg.train.eval_every),
                  desc="ddpm")
    if out.status != "completed":
        raise SystemExit(0)  # pre-empted: the checkpoint is saved, a requeued job resumes
    model = Run.unwrap(model)
    if run.is_main:
        # a zoo checkpoint (weights, the whole config, project, experiment): what
        # evaluate.py reads, and atomic (written, then renamed)
        save_checkpoint(run.state_dict(model=model, step=out.step), cfg.denoiser.ckpt)
    return model, dict(out.metrics)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive fcntl lock on ``path`` (created), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_denoiser(cfg: DictConfig, run: Run) -> tuple[DiffusionUNet, bool]:
    """The frozen denoiser of ``denoiser.ckpt`` in eval mode on the run's device, and
    whether this run trained it.

    ``denoiser.format=ddpm``: a published DDPM checkpoint (zoo.deq_ddim.convert);
    ``ours``: a file saved by `digits_ddpm`, trained here first when it is missing and
    ``denoiser.train_if_missing`` (under the file lock).
    """
    fmt, ckpt = str(cfg.denoiser.format), cfg.denoiser.ckpt
    if ckpt in (None, ""):
        raise ValueError("denoiser.ckpt is not set: pass denoiser.ckpt=<DDPM checkpoint file>")
    model, trained = build_model(cfg), False
    if fmt == "ddpm":
        load_ddpm_checkpoint(model, ckpt, ema=bool(cfg.denoiser.ema))
    elif fmt == "ours":
        path = Path(str(ckpt))
        if not path.is_file():
            if not cfg.denoiser.train_if_missing:
                raise FileNotFoundError(f"denoiser.ckpt={str(path)!r} does not exist: train it with "
                                        "+experiment=digits_ddpm or set denoiser.train_if_missing=true")
            with file_lock(path.with_name(path.name + ".lock")):
                if not path.is_file():  # another job may have trained it while we waited
                    train_denoiser(cfg, run)
                    trained = True
        model.load_state_dict(load_checkpoint(path, map_location="cpu")["model"])
    else:
        raise ValueError(f"denoiser.format={fmt!r}: use ours (a digits_ddpm file) or ddpm (published DDPM)")
    model = model.to(run.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, trained


def set_threads(cfg: DictConfig, run: Run) -> None:
    if cfg.train.get("cpu_threads") and run.device.type == "cpu":
        torch.set_num_threads(int(cfg.train.cpu_threads))


def train(cfg: DictConfig) -> dict:
    """Runs the experiment's task; returns its metrics (also in results.json)."""
    task = str(cfg.task)
    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}")
    if str(cfg.sampling.dtype) not in DTYPES:
        raise ValueError(f"sampling.dtype={cfg.sampling.dtype!r}: use float32 or float64")
    with Run(cfg, project="deq_ddim") as run:
        set_threads(cfg, run)
        if task == "ddpm":
            model, metrics = train_denoiser(cfg, run)
            run.write_results(metrics, extra={"params": count_parameters(model),
                                              "denoiser_ckpt": str(cfg.denoiser.ckpt)})
            return metrics
        denoiser, trained = load_denoiser(cfg, run)
        study = experiments.sampling_study if task == "sampling" else experiments.inversion_study
        metrics, extra = study(cfg, run, denoiser)
        extra.update(params=count_parameters(denoiser), denoiser_ckpt=str(cfg.denoiser.ckpt),
                     denoiser_trained_in_this_run=trained)
        run.write_results(metrics, extra=extra)
        return metrics


@zoo_main("deq_ddim")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
