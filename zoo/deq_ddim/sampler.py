"""DEQ-DDIM: the DDIM chain solved as one equilibrium with `core` (get_deq + its solvers).

`DEQSampler(denoiser, schedule, deq_options, chunk, mix)` wraps `core.get_deq` around
`zoo.deq_ddim.diffusion.JointDDIM`. `sample(x_T)` returns the trajectory (B, K, C, H, W)
and the solver's info; under autograd (training mode, or evaluation mode with x_T
requiring grad) the configured backward is attached (inversion: the 1-step phantom
gradient with tau 0.1, or IFT).

`mix` chooses what one solver row is, i.e. what Anderson mixes with one set of weights
and what stops early on its own:
  - ``image`` (default): the whole trajectory of one image (B rows of K*C*H*W);
  - ``slot``: each (image, timestep) latent (B*K rows of C*H*W), as upstream's sampler
    (locuslab/deq-ddim functions/ddim_anderson.py) batches its Anderson per slot. The
    slots of an image are coupled (the cumulative sum), so none may stop on its own
    while the slots before it still move (core freezes a row once its residual is below
    tol): the forward runs the whole budget (tol 1e-30) and an IFT backward solves the
    whole state as one row (``b_solver_kwargs.whole_state``); upstream, too, stops on
    one global residual only.
Anderson's ``lam`` is core's: relative to each residual's squared norm (the diagonal of
the Gram matrix is scaled by 1 + lam); upstream adds an absolute lam to it.

`Recorder` keeps the final image (slot K-1) of each solver call and a timestamp, so a
sampling experiment reads the DEQ's answer after every solver iteration from one solve.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from core import DEQConfig, get_deq
from zoo.deq_ddim.diffusion import Denoiser, JointDDIM, Schedule

MIX_MODES = ("image", "slot")


class Recorder:
    """Per map evaluation: the final images f(z)[:, -1], the whole trajectory of image 0
    (detached copies) and the seconds since the recorder was made."""

    def __init__(self):
        self.finals: list[torch.Tensor] = []
        self.snapshots: list[torch.Tensor] = []
        self.times: list[float] = []
        self.start = time.perf_counter()

    def __call__(self, traj: torch.Tensor) -> None:
        self.finals.append(traj[:, -1].detach().clone())
        self.snapshots.append(traj[0].detach().clone())
        self.times.append(time.perf_counter() - self.start)


class DEQSampler(nn.Module):
    """The DDIM trajectory as the fixed point of `JointDDIM`, solved by a `core` DEQ."""

    def __init__(self, denoiser: Denoiser, schedule: Schedule, deq_options: Any = None,
                 chunk: int = 0, mix: str = "image"):
        super().__init__()
        if mix not in MIX_MODES:
            raise ValueError(f"sampling.mix={mix!r}: use image (one row per image) or slot "
                             "(one row per (image, timestep), as upstream)")
        self.joint = JointDDIM(denoiser, schedule, chunk)
        self.schedule, self.mix = schedule, mix
        options = DEQConfig.from_any(deq_options)
        if mix == "slot":
            options.update(f_tol=1e-30, b_solver_kwargs={**options.b_solver_kwargs, "whole_state": True})
        self.deq = get_deq(options)

    def sample(self, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None,
               z_init: Optional[torch.Tensor] = None, solver_kwargs: Optional[dict] = None,
               recorder: Optional[Callable[[torch.Tensor], None]] = None):
        """(trajectory (B, K, C, H, W) with its gradient attached, info); z_init: a warm start."""
        b, k = x_T.shape[0], self.schedule.num_latents
        shape = (b, k, *x_T.shape[1:])

        def f(z: torch.Tensor) -> torch.Tensor:
            out = self.joint(z.reshape(shape), x_T, noise)
            if recorder is not None:
                recorder(out)
            return out.reshape(z.shape)

        z0 = self.joint.initial_state(x_T) if z_init is None else z_init.detach()
        if self.mix == "slot":
            z0 = z0.reshape(b * k, *x_T.shape[1:])
        z_out, info = self.deq(f, z0, solver_kwargs=solver_kwargs)
        return z_out[-1].reshape(shape), info
