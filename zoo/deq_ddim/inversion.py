"""Diffusion inversion: find x_T whose DDIM sample x_0 matches a target image.

Both ways optimise x_T with Adam on the per-image sum of squared errors
||x_0(x_T) - target||^2 (data in [-1, 1]; what Table 6 calls MSE), with gradient-norm
clipping, from the deterministic DDIM encoding of the target, and stop at a loss
threshold or a wall-time budget (a batch of images at once: Adam is per element, so
each image's optimisation is its own):

- ``deq``: x_0 from `DEQSampler` in training mode, so the backward is the DEQ's
  (the 1-step phantom gradient with tau 0.1 of the TorchDEQ recipe); each step's solve
  starts from the previous step's trajectory (upstream keeps the whole trajectory in its
  Adam leaf, which warm-starts the same way);
- ``sequential``: backpropagation through the K denoiser calls of the sequential sampler.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from zoo.deq_ddim.diffusion import Denoiser, Schedule, ddim_sample
from zoo.deq_ddim.sampler import DEQSampler

METHODS = ("deq", "sequential")


def sse(x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared errors (B,)."""
    return (x0 - target).pow(2).flatten(1).sum(dim=1)


@dataclass
class InversionTrace:
    """One image's optimisation: its loss before each Adam step and the wall time then."""

    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    best_loss: float = math.inf
    best_x0: Optional[torch.Tensor] = None
    time_to_threshold: Optional[float] = None
    steps: int = 0
    solver_iters: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {"final_loss": self.best_loss, "time_to_threshold_s": self.time_to_threshold,
                "steps": self.steps, "time_s": self.times[-1] if self.times else 0.0,
                "mean_step_s": (self.times[-1] / self.steps) if self.steps else None,
                "mean_solver_iters": (sum(self.solver_iters) / len(self.solver_iters)) if self.solver_iters else None}


def deq_forward(sampler: DEQSampler) -> Callable[[torch.Tensor], tuple[torch.Tensor, Optional[float]]]:
    """x_T -> (x_0 with the DEQ's backward attached, solver steps), warm-started across calls."""
    state = {"traj": None}

    def forward(x_T: torch.Tensor):
        sampler.train()
        traj, info = sampler.sample(x_T, z_init=state["traj"])
        state["traj"] = traj.detach()
        return traj[:, -1], float(info["nstep"].float().mean())

    return forward


def sequential_forward(denoiser: Denoiser, schedule: Schedule) -> Callable:
    """x_T -> (x_0 through the sequential sampler, with its whole graph; None)."""
    return lambda x_T: (ddim_sample(denoiser, schedule, x_T), None)


class Inversion:
    """Adam on x_T for a batch of B images, one step at a time, with its own clock.

    Adam works per element, so the images of a batch are optimised independently (the
    loss is their sum); the gradient is clipped per image (norm `grad_clip`, upstream's
    5e4 for its single image). An image's final loss is the lowest it reached, as
    upstream. `elapsed` counts only the time spent in this inversion's own steps, so two
    inversions stepped in turn (`run_side_by_side`) share the machine's load fairly.
    """

    def __init__(self, forward: Callable, x_T_init: torch.Tensor, target: torch.Tensor, *, lr: float,
                 max_steps: int, threshold: float, time_budget_s: float, grad_clip: float = 5e4):
        self.forward, self.target = forward, target
        self.x_T = x_T_init.detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x_T], lr=lr)
        self.max_steps, self.threshold, self.budget, self.grad_clip = max_steps, threshold, time_budget_s, grad_clip
        self.traces = [InversionTrace() for _ in range(self.x_T.shape[0])]
        self.elapsed, self.evaluations, self.done = 0.0, 0, False

    def step(self) -> None:
        """Evaluate the loss (recorded), then one Adam step unless a stop rule holds."""
        start = time.perf_counter()
        x0, iters = self.forward(self.x_T)
        losses = sse(x0, self.target)
        values = losses.detach().tolist()
        now = self.elapsed + (time.perf_counter() - start)  # when this loss was known
        self.evaluations += 1
        for i, (trace, value) in enumerate(zip(self.traces, values)):
            trace.losses.append(value)
            trace.times.append(now)
            if iters is not None:
                trace.solver_iters.append(iters)
            if value < trace.best_loss:
                trace.best_loss, trace.best_x0 = value, x0[i].detach().clone()
            if value < self.threshold and trace.time_to_threshold is None:
                trace.time_to_threshold = now
        self.done = (self.evaluations > self.max_steps or now >= self.budget
                     or all(t.time_to_threshold is not None for t in self.traces))
        if not self.done:
            t1 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            if self.grad_clip:
                norms = self.x_T.grad.flatten(1).norm(dim=1).clamp_min(1e-30)
                self.x_T.grad.mul_((self.grad_clip / norms).clamp(max=1.0).view(-1, *[1] * (self.x_T.dim() - 1)))
            self.opt.step()
            now += time.perf_counter() - t1
            for trace in self.traces:
                trace.steps += 1
        self.elapsed = now


def run_side_by_side(inversions: list[Inversion]) -> None:
    """Steps the inversions in turn until each has stopped (each on its own clock)."""
    while not all(inv.done for inv in inversions):
        for inv in inversions:
            if not inv.done:
                inv.step()


def gradient_cosine(sampler: DEQSampler, denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor,
                    target: torch.Tensor) -> list[float]:
    """Per image, the cosine between the DEQ's gradient of the loss w.r.t. x_T (its
    configured backward, cold start) and the exact one (backpropagation through the
    sequential sampler)."""
    grads = []
    for forward in (deq_forward(sampler), sequential_forward(denoiser, schedule)):
        x = x_T.detach().clone().requires_grad_(True)
        x0, _ = forward(x)
        (g,) = torch.autograd.grad(sse(x0, target).sum(), x)
        grads.append(g.flatten(1).double())
    return torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1).tolist()
