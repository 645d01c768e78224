"""Optimisers, learning-rate schedules and gradient clipping used by the zoo recipes.

Config shapes (any mapping: a DictConfig node, a dict)::

    optim: {name: sgd, lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 1e-4}
    optim: {name: adam | adamw, lr: 2.5e-4, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0}
    sched: {name: constant | cosine | one_cycle | step,
            warmup_steps: 0,                  # linear warm-up from 0 (constant, cosine, step):
                                              # steps, or a fraction of the run (0.1)
            eta_min: 0.0,                     # cosine floor
            pct_start: 0.05, anneal: linear,  # one_cycle (DEQ-Flow: OneCycleLR, linear anneal)
            div_factor: 25, final_div_factor: 1e4,
            step_size: 1000, gamma: 0.1}      # step
    clip: {norm: 0.25}  or  {value: 0.1}  or  {}   # by total L2 norm / by value

Schedules are stepped once per optimiser step (``total_steps`` = the run's step count),
which matches the recipes (MDEQ's per-iteration cosine, DEQ-Flow's OneCycleLR, the
DEQ Transformer's warm-up + cosine). `ClockedSchedule` drives any of them by the share
of a time budget spent instead (a run that trains for N minutes, not N steps).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "one_cycle", "step")

_OPTIM_KEYS = {
    "sgd": {"lr", "momentum", "nesterov", "weight_decay", "dampening"},
    "adam": {"lr", "betas", "eps", "weight_decay", "amsgrad"},
    "adamw": {"lr", "betas", "eps", "weight_decay", "amsgrad"},
}


def _get(cfg: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


def build_optimizer(params: Iterable[torch.nn.Parameter] | torch.nn.Module,
                    cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """An SGD / Adam / AdamW optimiser from ``cfg`` (``name`` plus that optimiser's options)."""
    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    name = str(_get(cfg, "name", "adam")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}: choose one of {OPTIMIZERS}")
    unknown = {k for k in cfg if cfg[k] is not None} - _OPTIM_KEYS[name] - {"name"}  # null: not set
    if unknown:
        raise ValueError(f"optim: options {sorted(unknown)} do not apply to {name}; "
                         f"allowed: {sorted(_OPTIM_KEYS[name])}")
    kw = {k: cfg[k] for k in _OPTIM_KEYS[name] if k in cfg and cfg[k] is not None}
    if "lr" not in kw:
        raise ValueError("optim.lr is required")
    kw["lr"] = float(kw["lr"])
    if "betas" in kw:
        kw["betas"] = tuple(float(b) for b in kw["betas"])
    if name == "sgd":
        if kw.get("nesterov") and not kw.get("momentum"):
            raise ValueError("optim.nesterov=true needs optim.momentum > 0")
        return torch.optim.SGD(params, **kw)
    if name == "adam":
        return torch.optim.Adam(params, **kw)
    return torch.optim.AdamW(params, **kw)


def _warmup_then(fn, warmup: int):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return fn(step - warmup)

    return factor


def warmup_steps(value: Any, total_steps: int) -> int:
    """``sched.warmup_steps``: a step count (>= 1), or a fraction of the run (0 <= value < 1),
    so that a shortened run (``train.steps=50``) warms up over the same share of it."""
    value = float(value or 0)
    if value < 0:
        raise ValueError(f"sched.warmup_steps={value}: a step count or a fraction of the run, >= 0")
    if value < 1:
        return int(round(value * total_steps))
    if value != int(value):
        raise ValueError(f"sched.warmup_steps={value}: a whole step count, or a fraction below 1")
    return int(value)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any] | None,
                    total_steps: int) -> LRScheduler:
    """A per-step learning-rate schedule (see the module docstring for the options)."""
    name = str(_get(cfg, "name", "constant")).lower()
    if name not in SCHEDULES:
        raise ValueError(f"sched.name={name!r}: choose one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: a schedule needs at least one step")
    warmup = warmup_steps(_get(cfg, "warmup_steps", 0), total_steps)
    if name == "one_cycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=total_steps,
            pct_start=float(_get(cfg, "pct_start", 0.3)),
            anneal_strategy=str(_get(cfg, "anneal", "linear")),
            div_factor=float(_get(cfg, "div_factor", 25.0)),
            final_div_factor=float(_get(cfg, "final_div_factor", 1e4)),
            cycle_momentum=bool(_get(cfg, "cycle_momentum", False)),
        )
    if name == "constant":
        return LambdaLR(optimizer, _warmup_then(lambda s: 1.0, warmup))
    if name == "step":
        step_size = int(_get(cfg, "step_size", max(total_steps // 3, 1)))
        gamma = float(_get(cfg, "gamma", 0.1))
        return LambdaLR(optimizer, _warmup_then(lambda s: gamma ** (s // step_size), warmup))
    # cosine from the base lr to eta_min over the steps after warm-up
    eta_min = float(_get(cfg, "eta_min", 0.0))
    span = max(total_steps - warmup, 1)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def cosine_for(base: float):
        floor = eta_min / base if base > 0 else 0.0
        return _warmup_then(
            lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span)), warmup)

    return LambdaLR(optimizer, [cosine_for(b) for b in base_lrs])


def clip_gradients(parameters: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any] | None) -> float | None:
    """Clips gradients in place by total norm (``clip.norm``) or by value (``clip.value``).

    Returns the total gradient norm before clipping when clipping by norm (for logging),
    else None. Call after ``scaler.unscale_(optimizer)`` when training in fp16.
    """
    if not cfg:
        return None
    norm = _get(cfg, "norm", None)
    value = _get(cfg, "value", None)
    params = [p for p in parameters if p.grad is not None]
    if norm is not None and float(norm) > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, float(norm)))
    if value is not None and float(value) > 0:
        torch.nn.utils.clip_grad_value_(params, float(value))
    return None


class ClockedSchedule:
    """A per-step schedule that follows the share of a time budget spent, not the step count.

    ``inner`` is a schedule built over ``resolution`` steps (`build_scheduler`); each
    `step` moves it to the step of the budget's share spent so far, so a warm-up and an
    anneal take the same share of the budget however fast the steps turn out. The clock
    (``clock``: ``time.perf_counter`` or ``time.process_time``) runs from construction;
    `done` is True once ``budget_s`` is spent (`Run.fit`'s ``until``). The time spent is
    checkpointed with the schedule, so a resumed run goes on where it stopped. For one
    process: under DDP each rank's clock would set its own learning rate.
    """

    def __init__(self, inner: LRScheduler, resolution: int, budget_s: float,
                 clock: Callable[[], float] = time.perf_counter):
        if resolution < 1 or budget_s <= 0:
            raise ValueError(f"ClockedSchedule: resolution={resolution} and budget_s={budget_s} must be > 0")
        self.inner, self.resolution, self.budget_s, self.clock = inner, int(resolution), float(budget_s), clock
        self.spent_before_s = 0.0
        self._start = clock()

    def elapsed_s(self) -> float:
        return self.spent_before_s + self.clock() - self._start

    def done(self, step: int | None = None) -> bool:
        """The budget is spent (``step`` is ignored: the signature of `Run.fit`'s ``until``)."""
        return self.elapsed_s() >= self.budget_s

    def step(self) -> None:
        share = min(self.elapsed_s() / self.budget_s, 1.0)
        self.inner.last_epoch = min(int(share * self.resolution), self.resolution - 1) - 1
        self.inner.step()  # the closed-form schedules compute the lr of last_epoch + 1

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "spent_s": self.elapsed_s(), "resolution": self.resolution}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The checkpointed schedule, its resolution (the inner one was built over it) and time spent."""
        self.inner.load_state_dict(state["inner"])
        self.resolution = int(state.get("resolution", self.resolution))
        self.spent_before_s, self._start = float(state["spent_s"]), self.clock()
