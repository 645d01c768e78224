"""`Run`: the runtime of one training or evaluation run, shared by the six projects.

A project keeps its own training loop, or hands a step function to `Run.fit`. A whole
``zoo/<project>/train.py``::

    from zoo.common import Run, zoo_main, build_optimizer, build_scheduler

    @zoo_main("mdeq")                      # configs/mdeq/config.yaml + experiment/<name>.yaml
    def main(cfg):
        with Run(cfg, project="mdeq") as run:      # seeds, device, DDP, out dir, logger
            train_set, test_set = load_data(cfg.data)
            model = run.wrap(build_model(cfg))      # .to(device), DDP under torchrun
            optimizer = build_optimizer(model, cfg.optim)
            scheduler = build_scheduler(optimizer, cfg.sched, cfg.train.steps)
            batches = run.loader(train_set, batch_size=cfg.train.batch_size, shuffle=True)

            def train_step(batch, step):
                x, y = (t.to(run.device) for t in batch)
                with run.autocast():
                    logits, info = model(x)
                    loss = F.cross_entropy(logits, y)
                run.backward_step(loss, optimizer, model.parameters(), cfg.clip, scheduler)
                return {"train/loss": loss, "deq_info": info}      # info -> deq/* diagnostics

            def evaluate(step):
                top1, info = evaluate_top1(model, test_set, run)
                return {"test/top1": top1, "deq_info": info}

            out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler,
                          train_step=train_step, batches=batches, total_steps=cfg.train.steps,
                          evaluate=evaluate, eval_every=cfg.train.eval_every)
            run.write_results(out.metrics, deq_stats=out.deq)

    if __name__ == "__main__":
        main()

``python -m zoo.mdeq.train +experiment=cifar_tiny deq=anderson_ift seed=1`` then writes
``outputs/mdeq/cifar_tiny/<time>/`` with ``config.yaml`` (resolved), ``metrics.jsonl``,
``checkpoints/step_*.pt``, ``results.json`` and ``wandb/`` (offline), and points
``outputs/mdeq/cifar_tiny/latest`` at it. The runtime options (seed, device, amp, resume,
log, logger, checkpoint) are in ``configs/run_defaults.yaml``.

Resume: the run continues from the newest valid checkpoint of its own directory (a
requeued SLURM job re-runs in the same directory); ``resume=auto`` also looks at the
earlier runs of the same experiment (newest first) and takes the first with this run's
config (zoo/common/resume.py says exactly which), ``resume=<file or run dir>`` names one;
``init_from=<checkpoint>`` starts a fresh run from another run's weights.
Model, optimiser, scheduler, grad scaler, step, epoch, position in the epoch and every RNG
state are restored, so a resumed deterministic run ends with the parameters of an
uninterrupted one. SIGTERM (and SIGUSR2, submitit's pre-emption signal) makes `fit` save
a checkpoint at the next step boundary; it then returns with ``status="preempted"``, or
hands over to submitit's handler, which requeues the job.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from zoo.common import console, curves, resume
from zoo.common import distributed as zdist
from zoo.common.config_keys import command_line_overrides
from zoo.common.console import ConsoleLog
from zoo.common.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from zoo.common.config_check import check_runtime_options, compile_settings
from zoo.common.logger import MetricLogger, deq_metrics, peak_memory_mb
from zoo.common.optim import clip_gradients
from zoo.common.progress import progress as _progress, progress_enabled
from zoo.common.results import build_results, write_results

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def seed_everything(seed: int) -> None:
    """Seeds ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def experiment_name(cfg: DictConfig) -> str:
    """The ``+experiment=<name>`` choice of this run (``default`` when none was given)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("experiment")
        return str(choice) if choice else "default"
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    return str(choice) if choice else str(cfg.get("experiment_name") or "default")


def _hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return None


@dataclass
class FitOutput:
    """What `Run.fit` ends with."""

    metrics: dict[str, float] = field(default_factory=dict)   # last evaluation (or last train log)
    deq: dict[str, float] = field(default_factory=dict)       # DEQ diagnostics of that evaluation
    step: int = 0
    status: str = "completed"                                  # or "preempted"


class Run:
    """Seed, device, process group, run directory, logger, checkpoints and results of a run.

    Attributes: ``cfg``, ``project``, ``experiment``, ``device``, ``rank``, ``world_size``,
    ``is_main``, ``out_dir``, ``logger`` (`MetricLogger`), ``checkpoint``
    (`CheckpointManager` of ``out_dir/checkpoints``), ``scaler`` (GradScaler, enabled for
    ``amp=fp16``), ``amp_dtype``.

    ``mode="eval"`` (evaluate.py) writes no checkpoints and never resumes.
    ``out_dir`` overrides the directory (default: Hydra's run dir, else a fresh
    ``outputs/<project>/<experiment>/<time>``).
    """

    def __init__(self, cfg: DictConfig, project: str | None = None, *, mode: str = "train",
                 out_dir: str | Path | None = None, experiment: str | None = None):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode={mode!r}: use train or eval")
        check_runtime_options(cfg)
        self.cfg = cfg
        self.mode = mode
        self.project = project or str(cfg.get("project"))
        self.experiment = experiment or experiment_name(cfg)
        self.start_time = time.time()
        self.console: ConsoleLog | None = None
        self.training_started = False

        self.dist = zdist.env_dist_info()
        self.rank, self.world_size, self.is_main = self.dist.rank, self.dist.world_size, self.dist.is_main
        self.device = zdist.resolve_device(str(cfg.get("device", "auto")), self.dist)
        zdist.init_distributed(self.device, self.dist)
        if cfg.get("deterministic", False):
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.seed = int(cfg.get("seed", 0))
        seed_everything(self.seed)  # the same on every rank: identical initial parameters
        threads = OmegaConf.select(cfg, "train.cpu_threads", default=None)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))

        self.out_dir = self._decide_out_dir(out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self._config_without_hydra(), self.out_dir / "config.yaml", resolve=True)
            self.console = ConsoleLog(self.out_dir / ("train.log" if mode == "train" else "evaluate.log"))

        amp = str(cfg.get("amp", "none") or "none")
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(amp == "fp16"))

        wandb_cfg = OmegaConf.select(cfg, "logger.wandb", default=None) or {}
        self.logger = MetricLogger(
            self.out_dir, enabled=self.is_main,
            wandb_mode=str(wandb_cfg.get("mode", "offline")),
            wandb_project=str(wandb_cfg.get("project", "deq-zoo")),
            wandb_entity=wandb_cfg.get("entity"), tags=list(wandb_cfg.get("tags") or []),
            run_name=f"{self.project}/{self.experiment}/{self.out_dir.name}",
            config=OmegaConf.to_container(self._config_without_hydra(), resolve=True),
        )
        ckpt_cfg = cfg.get("checkpoint") or {}
        self.checkpoint = CheckpointManager(self.out_dir / "checkpoints", keep=int(ckpt_cfg.get("keep", 3)),
                                            enabled=self.is_main and mode == "train")
        self.log_every = int(OmegaConf.select(cfg, "log.every", default=10) or 0)
        self.show_progress = progress_enabled(OmegaConf.select(cfg, "log.progress", default=True), self.is_main)

        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        if mode == "train":
            self._install_signal_handlers()
        self.train_time_s = 0.0
        self.steps_this_session = 0
        self.global_step = 0  # the optimiser step `fit` reached (counting steps before a resume)
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ directories
    def _config_without_hydra(self) -> DictConfig:
        return OmegaConf.masked_copy(self.cfg, [k for k in self.cfg.keys() if k != "hydra"])

    def _decide_out_dir(self, out_dir: str | Path | None) -> Path:
        if out_dir is None:
            out_dir = _hydra_output_dir()
        if out_dir is None:
            stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")  # as configs/run_defaults.yaml
            root = Path(os.environ.get("ZOO_OUTPUTS", "outputs"))
            out_dir = root / self.project / self.experiment / stamp
        out_dir = Path(out_dir).absolute()
        if self.dist.enabled:  # every rank ran Hydra on its own: use rank 0's directory
            shared = [str(out_dir)]
            dist.broadcast_object_list(shared, src=0)
            out_dir = Path(shared[0])
        return out_dir

    def _point_latest(self) -> None:
        """``<experiment dir>/latest`` -> this run's directory, or its multirun folder (a relative symlink).

        Called when training starts, so a run that fails before (missing data, a bad
        option) leaves ``latest`` where it was.
        """
        target, parent = self.out_dir, self.out_dir.parent
        if parent.name.startswith("multirun_"):
            target, parent = parent, parent.parent
        link = parent / "latest"
        tmp = parent / f".latest.tmp{os.getpid()}"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(os.path.relpath(target, parent), tmp)
            os.replace(tmp, link)
        except OSError:  # no symlinks on this filesystem: a text file instead
            tmp.unlink(missing_ok=True)
            link.unlink(missing_ok=True)
            link.write_text(str(target) + "\n")

    # ------------------------------------------------------------------ model helpers
    def wrap(self, model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        """Moves ``model`` to the device; wraps it in DDP under torchrun, then in
        ``torch.compile`` when ``compile`` is not ``none``, with ``compile_backend`` and
        ``compile_options`` (checkpoints hold the inner module's keys either way: see
        `unwrap`)."""
        model = model.to(self.device)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if self.device.type == "cuda":
                ddp_kwargs.setdefault("device_ids", [self.device.index])
            model = DistributedDataParallel(model, **ddp_kwargs)
        mode, backend, options = compile_settings(self.cfg)
        if mode != "none":
            kwargs = {"options": options} if options else {}
            if mode != "default":
                kwargs["mode"] = mode
            model = torch.compile(model, backend=backend, **kwargs)
        return model

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        """The module inside a DDP / torch.compile wrapper."""
        while True:
            inner = getattr(model, "module", None)
            if not isinstance(inner, torch.nn.Module):
                inner = getattr(model, "_orig_mod", None)
            if not isinstance(inner, torch.nn.Module):
                return model
            model = inner

    def autocast(self):
        """``torch.autocast`` with the run's ``amp`` dtype (a no-op context for ``amp=none``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      parameters: Iterable[torch.nn.Parameter] | None = None,
                      clip: Mapping[str, Any] | None = None, scheduler: Any = None) -> float | None:
        """backward (scaled for fp16), unscale, clip, optimiser step, scheduler step, zero grads.

        Returns the gradient norm before clipping when clipping by norm.
        """
        self.scaler.scale(loss).backward()
        grad_norm = None
        if clip and parameters is not None:
            self.scaler.unscale_(optimizer)
            grad_norm = clip_gradients(parameters, clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return grad_norm

    def loader(self, dataset: Any, *, batch_size: int, shuffle: bool = True, drop_last: bool = False,
               num_workers: int = 0, collate_fn: Callable | None = None, **kwargs: Any):
        """``batches(epoch, start)`` for `fit`: this rank's shard of ``dataset``, from batch ``start``.

        Built on `ResumableSampler` and a per-epoch seeded DataLoader generator, so the
        batches depend only on (seed, epoch) and a resumed run sees exactly the remaining ones.
        ``batch_size`` is per rank.
        """
        from torch.utils.data import DataLoader

        sampler = zdist.ResumableSampler(len(dataset), shuffle=shuffle, seed=self.seed, rank=self.rank,
                                         world_size=self.world_size, drop_last=drop_last)

        def batches(epoch: int, start: int = 0):
            sampler.set_epoch(epoch, start * batch_size)
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                              num_workers=num_workers, collate_fn=collate_fn, generator=generator, **kwargs)

        batches.sampler = sampler
        return batches

    def progress(self, iterable: Iterable, total: int | None = None, desc: str | None = None,
                 initial: int = 0) -> Iterable:
        """A tqdm bar on the main rank in a terminal when ``log.progress`` is on."""
        return _progress(iterable, total=total, desc=desc, enabled=self.show_progress, initial=initial)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
                   step: int = 0, epoch: int = 0, batch_in_epoch: int = 0,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resume needs, as one dict (see `restore`)."""
        return {
            "model": self.unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "rng": rng_state(),
            "extra": {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in (extra or {}).items()},
            "config": OmegaConf.to_container(self._config_without_hydra(), resolve=True),
            "project": self.project, "experiment": self.experiment, "world_size": self.world_size,
        }

    def find_resume_checkpoint(self, total_steps: int = 0) -> Path | None:
        """The checkpoint this run continues from (`zoo.common.resume`), or None."""
        if self.mode != "train":
            return None
        found = None
        if self.is_main:
            ours = OmegaConf.to_container(self._config_without_hydra(), resolve=True)
            found = resume.choose(self.cfg.get("resume"), ours, self.out_dir, total_steps, say=print)
        if self.dist.enabled:
            shared = [str(found) if found else None]
            dist.broadcast_object_list(shared, src=0)
            found = Path(shared[0]) if shared[0] else None
        return found

    def restore(self, state: Mapping[str, Any], *, model: torch.nn.Module, optimizer: Any = None,
                scheduler: Any = None, extra: Mapping[str, Any] | None = None,
                restore_rng: bool = True) -> None:
        """Loads what `state_dict` saved into the live objects."""
        self.unwrap(model).load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for key, obj in (extra or {}).items():
            saved = state.get("extra", {}).get(key)
            if saved is not None and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(saved)
        if restore_rng and state.get("rng"):
            set_rng_state(state["rng"])

    def load_model(self, model: torch.nn.Module, path: str | Path | None = None, strict: bool = True) -> dict:
        """Loads a checkpoint's model weights (evaluate.py); returns the checkpoint dict.

        ``path`` defaults to ``cfg.ckpt``; a run directory means its newest valid checkpoint.
        """
        path = path if path is not None else self.cfg.get("ckpt")
        if path in (None, ""):
            raise ValueError("ckpt is not set: pass ckpt=<checkpoint file or run directory>")
        state = load_checkpoint(path, map_location=self.device)
        self.unwrap(model).load_state_dict(state["model"], strict=strict)
        return state

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_signal = signum

        for sig in STOP_SIGNALS:
            try:
                self._previous_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread: no signal handling
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def _hand_over_signal(self) -> None:
        """After saving: let submitit's handler (if it installed one) requeue the job."""
        previous = self._previous_handlers.get(self.stop_signal)
        if callable(previous):
            previous(self.stop_signal, None)

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Logs ``metrics`` (a ``deq_info`` entry is turned into ``deq/*`` diagnostics)."""
        metrics = dict(metrics)
        info = metrics.pop("deq_info", None)
        metrics.update(deq_metrics(info))
        return self.logger.log(step, metrics)

    # ------------------------------------------------------------------ the loop
    def fit(self, *, model: torch.nn.Module, train_step: Callable[[Any, int], Mapping[str, Any]],
            batches: Callable[[int, int], Iterable], total_steps: int, optimizer: Any = None,
            scheduler: Any = None, evaluate: Optional[Callable[[int], Mapping[str, Any]]] = None,
            eval_every: int | None = None, ckpt_every: int | None = None, extra_state: Mapping[str, Any] | None = None,
            desc: str = "train", until: Optional[Callable[[int], bool]] = None) -> FitOutput:
        """A step-based training loop with logging, evaluation, checkpoints and exact resume.

        ``train_step(batch, step)`` runs one optimiser step (``step`` counts from 1) and
        returns metrics; a ``deq_info`` entry (the ``info`` dict of a DEQ call) becomes the
        ``deq/*`` diagnostics, computed only on logging steps. ``batches(epoch, start)``
        yields this rank's batches of an epoch from batch ``start`` on (`Run.loader` builds
        one). ``evaluate(step)`` returns metrics (with an optional ``deq_info``); it runs
        every ``eval_every`` steps and at the end. Checkpoints every ``ckpt_every`` steps
        (default ``checkpoint.every``), at the end and on SIGTERM/SIGUSR2. ``extra_state``:
        more objects with ``state_dict``/``load_state_dict`` to checkpoint. ``until(step)``,
        asked after every step, ends the training there when it is True on any rank (a time
        budget): the run completes as at ``total_steps``, which is then only a cap.
        """
        if ckpt_every is None:
            ckpt_every = int(OmegaConf.select(self.cfg, "checkpoint.every", default=0) or 0)
        if eval_every is None:  # about five evaluations a run, so a long run shows its test metric
            eval_every = max(total_steps // 5, 1)
        step, epoch, batch_in_epoch = 0, 0, 0
        resume_path = self.find_resume_checkpoint(total_steps)
        if resume_path is not None:
            state = load_checkpoint(resume_path, map_location="cpu")
            self.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, extra=extra_state)
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.global_step = step
            self.resumed_from = resume_path
            self.logger.log(step, {"event": "resumed", "from": str(resume_path)})
            self.say(f"resumed from {resume_path} at step {step}")
        elif self.cfg.get("init_from"):
            self.init_from(model, self.cfg.init_from)
        if self.is_main:
            self._point_latest()  # training starts: `latest` names this run
        self.training_started = True

        def save() -> None:
            self.checkpoint.save(self.state_dict(model=model, optimizer=optimizer, scheduler=scheduler,
                                                 step=step, epoch=epoch, batch_in_epoch=batch_in_epoch,
                                                 extra=extra_state), step)
            zdist.barrier()

        output = FitOutput(step=step)
        last_eval: dict[str, Any] = {}
        bar = self.progress(range(step, total_steps), total=total_steps, desc=desc, initial=step)
        bar_iter = iter(bar)
        window_time, window_steps = 0.0, 0
        while step < total_steps:
            steps_before = step
            t0 = time.perf_counter()  # a step's time includes fetching its batch, not evaluation
            for batch in batches(epoch, batch_in_epoch):
                model.train()
                # the learning rate this step uses (after it, a schedule may already point past its end)
                lr = optimizer.param_groups[0]["lr"] if optimizer is not None else None
                metrics = train_step(batch, step + 1)
                if self.device.type == "cuda" and self.log_every and (step + 1) % self.log_every == 0:
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                step += 1
                batch_in_epoch += 1
                self.global_step = step
                next(bar_iter, None)
                self.train_time_s += dt
                self.steps_this_session += 1
                window_time += dt
                window_steps += 1
                if self.log_every and step % self.log_every == 0:
                    record = dict(metrics)
                    record.update({"time/step_s": window_time / window_steps,
                                   "mem/peak_mb": peak_memory_mb(self.device), "epoch": epoch})
                    if lr is not None:
                        record["lr"] = float(lr)
                    output.metrics = {k: v for k, v in self.log(step, record).items() if k != "step"}
                    window_time, window_steps = 0.0, 0
                    self._report_step(bar, step, total_steps, output.metrics, last_eval)
                if evaluate is not None and eval_every and step % eval_every == 0 and step < total_steps:
                    self._evaluate(evaluate, model, step, output)
                    last_eval = dict(output.metrics)
                if ckpt_every and step % ckpt_every == 0 and step < total_steps:
                    save()
                if self.should_stop():
                    save()
                    self.logger.log(step, {"event": "preempted", "signal": int(self.stop_signal or 0)})
                    output.step, output.status = step, "preempted"
                    self._close_bar(bar)
                    self.say(f"stopped by signal {int(self.stop_signal or 0)} at step {step}/{total_steps}: "
                             f"checkpoint {self.checkpoint.latest()}; resume with the same command "
                             f"plus resume={self.out_dir}")
                    self._plot_curve()
                    self._hand_over_signal()
                    return output
                if step >= total_steps or (until is not None and zdist.any_rank(bool(until(step)))):
                    break
                t0 = time.perf_counter()
            else:
                if step == steps_before and batch_in_epoch == 0:
                    raise ValueError(f"batches(epoch={epoch}, start=0) yielded no batch: is the dataset empty?")
                epoch += 1
                batch_in_epoch = 0
                continue
            break  # the inner loop ended the training (total_steps or `until`)
        self._close_bar(bar)
        if evaluate is not None:
            self._evaluate(evaluate, model, step, output)
        save()
        output.step = step
        self._plot_curve()
        return output

    # ------------------------------------------------------------------ console
    def say(self, text: str) -> None:
        """Prints one line on the main rank (it goes to ``train.log`` too)."""
        if self.is_main:
            print(text, flush=True)

    @property
    def tag(self) -> str:
        return f"{self.project}/{self.experiment}"

    def _report_step(self, bar: Any, step: int, total: int, record: Mapping[str, Any],
                     last_eval: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(console.bar_postfix(record), refresh=False)
        else:
            print(console.step_line(self.tag, step, total, record, last_eval), flush=True)

    @staticmethod
    def _close_bar(bar: Any) -> None:
        if hasattr(bar, "close"):
            bar.close()

    def _plot_curve(self) -> None:
        if not self.is_main:
            return
        reported = self.cfg.get("reported") or {}
        metrics = (reported.get("metrics") or {}) if isinstance(reported, Mapping) else {}
        main = next(iter(metrics.values()), None) or (reported.get("metric") if isinstance(reported, Mapping) else None)
        try:
            curves.plot_training_curve(self.out_dir / "metrics.jsonl", self.out_dir / "training_curve.png",
                                       title=f"{self.tag} ({self.out_dir.name})", main_metric=main)
        except Exception as err:  # a plot never fails a finished run
            print(f"[{self.tag}] training_curve.png not written: {err}", file=sys.stderr)

    def summary(self, metrics: Mapping[str, Any], status: str | None = None) -> None:
        """The one line a run ends with: final metrics, run directory, wall time."""
        status = status or ("evaluated" if self.mode == "eval" else "completed")
        self.say(console.summary_line(self.tag, status, metrics, self.out_dir, time.time() - self.start_time))

    def init_from(self, model: torch.nn.Module, path: str | Path) -> None:
        """Loads the model weights of another run's checkpoint into this fresh run (``init_from``)."""
        state = load_checkpoint(path, map_location="cpu")
        weights = state["model"] if isinstance(state, Mapping) and "model" in state else state
        self.unwrap(model).load_state_dict(weights)
        self.logger.log(0, {"event": "init_from", "from": str(path)})
        self.say(f"initialised the model from {path} (fresh optimiser and schedule)")

    def should_stop(self) -> bool:
        """True (on every rank) once a stop signal arrived; for loops that do not use `fit`.

        Under torchrun the ranks agree through a CPU all-reduce (gloo), which costs no GPU
        synchronisation, so it is asked after every step.
        """
        return zdist.any_rank(self.stop_signal is not None)

    def _evaluate(self, evaluate: Callable[[int], Mapping[str, Any]], model: torch.nn.Module, step: int,
                  output: FitOutput) -> None:
        model.eval()
        with torch.no_grad():
            metrics = dict(evaluate(step))
        model.train()
        info = metrics.pop("deq_info", None)
        output.deq = deq_metrics(info)
        record = self.log(step, {**metrics, **output.deq})
        output.metrics = {k: v for k, v in record.items() if k != "step" and k not in output.deq}

    # ------------------------------------------------------------------ results
    def write_results(self, metrics: Mapping[str, Any], *, deq_stats: Mapping[str, Any] | None = None,
                      reported: Any = "from_config", status: str | None = None,
                      extra: Mapping[str, Any] | None = None, **fields: Any) -> Path | None:
        """Writes ``<out_dir>/results.json`` (main rank); see `zoo.common.results`.

        ``reported`` defaults to the config's ``reported:`` block. Returns the path (None
        on other ranks).
        """
        if not self.is_main:
            return None
        if reported == "from_config":
            reported = self.cfg.get("reported")
        metrics = dict(metrics)
        info = metrics.pop("deq_info", None)
        deq = dict(deq_stats or {})
        deq.update(deq_metrics(info))
        if status is None:
            status = "evaluated" if self.mode == "eval" else "completed"
        record = build_results(
            project=self.project, experiment=self.experiment, seed=self.seed, metrics=metrics,
            reported=reported, deq_stats=deq, wall_time_s=time.time() - self.start_time,
            steps=self.steps_this_session or None, peak_memory_mb=peak_memory_mb(self.device),
            device=self.device, status=status, extra=extra,
            time_per_step_s=(self.train_time_s / self.steps_this_session) if self.steps_this_session else None,
            final_step=self.global_step or None, world_size=self.world_size, run_dir=str(self.out_dir),
            config_path=str(self.out_dir / "config.yaml"),
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            overrides=command_line_overrides(self.cfg),
            **fields,
        )
        path = write_results(self.out_dir / "results.json", record)
        if self.mode == "train" and not self.training_started:
            self._point_latest()  # a run that measures without `fit` (a sampling experiment)
        if self.mode == "train":
            self.summary({k: v for k, v in metrics.items()}, status=status)
        return path

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._restore_signal_handlers()
        self.logger.close()
        if self.console is not None:
            self.console.close()
        zdist.shutdown_distributed()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close()
        if exc_type is not None and self.mode == "train" and not self.training_started and self.is_main:
            discard_unstarted_run(self.out_dir)


def discard_unstarted_run(out_dir: Path) -> bool:
    """Removes the directory of a run that failed before training (missing data, a bad
    option): no checkpoint and no logged step. Returns True when it was removed."""
    import shutil

    out_dir = Path(out_dir)
    if not out_dir.is_dir() or (out_dir / "checkpoints").exists():
        return False
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return False
    shutil.rmtree(out_dir, ignore_errors=True)
    return True
