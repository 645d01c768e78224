"""Fit a DEQ-INR to one signal: ``python -m zoo.deq_inr.train +experiment=<name> [overrides]``.

One model per signal (an image, a video, a waveform), trained on its coordinates with
an MSE loss (TorchDEQ's fixed-point correction over the returned states when
``deq.n_states > 1``). Full batch by default; ``train.batch_coords=B`` trains on random
batches of B coordinates.

Amortised fixed point (``train.warm_start``, the images' and audio's recipe): the state
z* of every coordinate is kept between training steps and the next step starts from it
with a solver budget of ``train.warm_f_max_iter`` (0: no solve at all), so after the first
step (first epoch of batches) a step costs only the ``deq.grad`` phantom-gradient steps.
Video follows upstream: no cache, a solve every step (``deq=deq_inr_video``: 20 steps,
fixed-point correction with 2 states).

After the model, every baseline of ``train.baselines`` (``one_pass``: the explicit network
with the same parameters; ``siren``) trains for the same number of steps; their PSNRs go
into the same results.json (``<baseline>/test/psnr``). Pictures in the run dir:
``psnr_curve.png`` (PSNR against steps and training time) and ``reconstruction.png``
(images), ``waveform.png`` (audio) or ``frames.png`` (video).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from core import fp_correction
from zoo.common import Run, build_optimizer, build_scheduler, zoo_main
from zoo.deq_inr.data import Signal, build_datasets, input_scale, psnr
from zoo.deq_inr.model import DEQINR, Siren, count_parameters, get_size

ARCHS = ("deq", "one_pass", "siren")


def build_model(cfg: DictConfig, signal: Optional[Signal] = None, arch: Optional[str] = None) -> nn.Module:
    """The model of ``cfg.model`` for `signal` (loaded from ``cfg.data`` when None).

    `arch` picks ``deq`` (default, or ``one_pass`` when ``model.one_pass``), ``one_pass``
    or ``siren``; in and out features and the resolution-scaled input scale come from
    the signal.
    """
    m = cfg.model
    signal = signal if signal is not None else build_datasets(cfg.data)
    arch = arch or ("one_pass" if m.get("one_pass") else "deq")
    if arch not in ARCHS:
        raise ValueError(f"model arch {arch!r}: choose one of {ARCHS}")
    if arch == "siren":
        return Siren(signal.in_features, signal.out_features, layers=int(m.siren_layers),
                     width=int(m.siren_width), omega_0=float(m.siren_omega))
    size = get_size(m.get("size"), m.get("layers"), m.get("width"))
    return DEQINR(signal.in_features, signal.out_features, size=size, filter=str(m.filter),
                  input_scale=input_scale(m, signal), deq=cfg.deq, one_pass=arch == "one_pass",
                  gabor_alpha=float(m.get("gabor_alpha", 3.0)))


def optimizer_options(cfg: DictConfig, arch: str = "deq") -> dict:
    """``cfg.optim`` without nulls; SIREN gets ``optim.siren_lr`` (Sitzmann et al.'s 1e-4)."""
    opts = {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if v is not None}
    siren_lr = opts.pop("siren_lr", None)
    if arch == "siren" and siren_lr:
        opts["lr"] = siren_lr
    return opts


class WarmStart:
    """The amortised fixed point: the last state z of every training coordinate.

    `get(idx)` returns the cached states of the coordinates `idx` (zeros where none is
    cached yet) and whether all of them were cached; `put(idx, z)` stores new states.
    Checkpointed with the run (``state_dict``), so a resumed run keeps its warm start.
    """

    def __init__(self, n: int, width: int, device: torch.device):
        self.z = torch.zeros(n, width, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def get(self, idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        if idx is None:
            return self.z, bool(self.seen.all())
        return self.z[idx], bool(self.seen[idx].all())

    def put(self, idx: Optional[torch.Tensor], z: torch.Tensor) -> None:
        if idx is None:
            self.z.copy_(z)
            self.seen.fill_(True)
        else:
            self.z[idx] = z
            self.seen[idx] = True

    def state_dict(self) -> dict:
        return {"z": self.z, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.z.copy_(state["z"])
        self.seen.copy_(state["seen"])


def coordinate_batches(n: int, batch_coords: Optional[int], seed: int) -> Callable:
    """``batches(epoch, start)`` for `Run.fit`: the full batch (None) once per epoch, or a
    seeded permutation of the n coordinates in batches of `batch_coords`."""
    def batches(epoch: int, start: int = 0):
        if not batch_coords or batch_coords >= n:
            return iter([None] if start == 0 else [])
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(n, generator=g)
        return iter(list(order.split(int(batch_coords)))[start:])

    return batches


def make_train_step(model: nn.Module, signal: Signal, run: Run, optimizer, scheduler,
                    cfg: DictConfig, warm: Optional[WarmStart]) -> Callable:
    """One optimiser step on a batch of coordinate indices (None: all of them)."""
    coords = signal.train_coords.to(run.device)
    values = signal.train_values.to(run.device)
    gamma = float(cfg.deq.gamma)
    warm_budget = int(cfg.train.warm_f_max_iter)
    clock = {"train_s": 0.0, "last": {}}

    def train_step(idx, step):
        t0 = time.perf_counter()
        x, y = (coords, values) if idx is None else (coords[idx.to(run.device)], values[idx.to(run.device)])
        z0, solver_kwargs = None, None
        if warm is not None:
            z0, cached = warm.get(idx)
            if cached:
                solver_kwargs = {"f_max_iter": warm_budget}
        with run.autocast():
            outputs, info, z = model(x, z_init=z0, solver_kwargs=solver_kwargs)
            loss = fp_correction(F.mse_loss, (outputs, y), gamma=gamma)
        run.backward_step(loss, optimizer, model.parameters(), cfg.clip, scheduler)
        if warm is not None:
            warm.put(idx, z.float())
        clock["train_s"] += time.perf_counter() - t0
        out = {"train/loss": loss.detach(), "train/psnr": psnr(outputs[-1], y), "time/train_s": clock["train_s"]}
        clock["last"] = out
        if info:
            out["deq_info"] = info
        return out

    train_step.clock = clock
    return train_step


@torch.no_grad()
def predict(model: nn.Module, coords: torch.Tensor, chunk: int, solver_kwargs: Optional[dict] = None
            ) -> tuple[torch.Tensor, dict]:
    """The model's output at `coords` (solved from z = 0 in eval mode), in chunks of `chunk`
    coordinates; the solver statistics of all chunks concatenated."""
    was_training = model.training
    model.eval()
    preds, infos = [], []
    for part in coords.split(int(chunk) if chunk else len(coords)):
        outputs, info, _ = model(part, solver_kwargs=solver_kwargs)
        preds.append(outputs[-1].float())
        infos.append(info)
    model.train(was_training)
    info = {}
    if infos and infos[0]:
        for key in ("abs_lowest", "rel_lowest", "nstep"):
            info[key] = torch.cat([i[key].flatten().float() for i in infos])
        info["nfe"] = max(float(i.get("nfe", 0)) for i in infos)
    return torch.cat(preds), info


def signal_psnr(pred: torch.Tensor, signal: Signal) -> float:
    """The PSNR of a prediction of the test set: per frame then the mean for video, else
    over the whole signal."""
    target = signal.test_values.to(pred.device)
    if signal.kind == "video":
        frames = signal.test_shape[0]
        return float(psnr(pred.reshape(frames, -1), target.reshape(frames, -1), dims=(1,)).mean())
    return float(psnr(pred, target))


def evaluate_signal(model: nn.Module, signal: Signal, chunk: int, solver_kwargs: Optional[dict] = None
                    ) -> tuple[dict[str, Any], torch.Tensor]:
    """``({"test/psnr": .., "deq_info": ..}, test prediction)``: the model solved from z = 0."""
    device = next(model.parameters()).device
    pred, info = predict(model, signal.test_coords.to(device), chunk, solver_kwargs)
    return {"test/psnr": signal_psnr(pred, signal), "deq_info": info}, pred


def train_baseline(arch: str, cfg: DictConfig, signal: Signal, run: Run, steps: int) -> dict[str, Any]:
    """Trains baseline `arch` for `steps` steps with the same data and schedule; returns its
    final metrics, its PSNR curve and its test prediction (not resumable: it is cheap)."""
    model = build_model(cfg, signal, arch).to(run.device)
    optimizer = build_optimizer(model, optimizer_options(cfg, arch))
    scheduler = build_scheduler(optimizer, cfg.sched, steps)
    train_step = make_train_step(model, signal, run, optimizer, scheduler, cfg, warm=None)
    batches = coordinate_batches(len(signal.train_coords), cfg.train.get("batch_coords"), run.seed)
    curve, step, epoch, every = [], 0, 0, max(int(run.log_every or 1), 1)
    while step < steps:
        for idx in batches(epoch, 0):
            step += 1
            metrics = train_step(idx, step)
            if step % every == 0 or step == steps:
                curve.append({"step": step, "train/psnr": float(metrics["train/psnr"]),
                              "time/train_s": metrics["time/train_s"]})
            if step >= steps:
                break
        epoch += 1
    results, pred = evaluate_signal(model, signal, cfg.eval.batch_coords)
    return {"test/psnr": results["test/psnr"], "train/psnr": curve[-1]["train/psnr"],
            "train_s": train_step.clock["train_s"], "params": count_parameters(model),
            "curve": curve, "pred": pred.cpu()}


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training (the model, then the baselines); returns the final metrics."""
    with Run(cfg, project="deq_inr") as run:
        if cfg.train.get("cpu_threads") and run.device.type == "cpu":
            torch.set_num_threads(int(cfg.train.cpu_threads))
        signal = build_datasets(cfg.data, run.out_dir)  # a missing file stops here, before any work
        inner = build_model(cfg, signal)
        model = run.wrap(inner)
        optimizer = build_optimizer(model, optimizer_options(cfg))
        steps = int(cfg.train.steps)
        scheduler = build_scheduler(optimizer, cfg.sched, steps)
        use_warm = bool(cfg.train.warm_start) and isinstance(inner, DEQINR) and not inner.one_pass
        warm = WarmStart(len(signal.train_coords), inner.width, run.device) if use_warm else None
        train_step = make_train_step(model, signal, run, optimizer, scheduler, cfg, warm)
        batches = coordinate_batches(len(signal.train_coords), cfg.train.get("batch_coords"), run.seed)
        last_pred: dict[str, torch.Tensor] = {}

        def evaluate(step):
            metrics, pred = evaluate_signal(model, signal, cfg.eval.batch_coords)
            last_pred["pred"] = pred.cpu()
            return metrics

        out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                      batches=batches, total_steps=steps, evaluate=evaluate,
                      eval_every=cfg.train.eval_every, extra_state={"warm_start": warm} if warm else None)
        if out.status != "completed":
            return out.metrics
        metrics = dict(out.metrics)
        if "train/psnr" in train_step.clock["last"]:  # absent when resumed at the last step
            metrics["train/psnr"] = float(train_step.clock["last"]["train/psnr"])
        baselines = {}
        for arch in cfg.train.get("baselines") or []:
            baselines[arch] = train_baseline(str(arch), cfg, signal, run, steps)
            for key in ("test/psnr", "train/psnr"):
                metrics[f"{arch}/{key}"] = baselines[arch][key]
        if run.is_main:
            from zoo.deq_inr.plots import save_pictures

            name = "one_pass" if getattr(inner, "one_pass", False) else "DEQ"
            save_pictures(run.out_dir, signal, name, last_pred.get("pred"), metrics, baselines)
        extra = {"params": count_parameters(inner), "input_scale": input_scale(cfg.model, signal),
                 "signal": {"kind": signal.kind, "name": signal.name, "train_shape": list(signal.train_shape),
                            "test_shape": list(signal.test_shape)},
                 "train_s": train_step.clock["train_s"],
                 "baselines": {a: {k: v for k, v in b.items() if k != "pred"} for a, b in baselines.items()}}
        run.write_results(metrics, deq_stats=out.deq, extra=extra)
        return metrics


@zoo_main("deq_inr")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
