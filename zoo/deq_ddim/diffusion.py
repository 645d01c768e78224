"""DDIM sampling as a sequence and as one fixed point (Pokle, Geng, Kolter, NeurIPS 2022, eq. 28-29).

`Schedule` holds the diffusion (linear betas over `num_steps` steps, alpha_bar_t =
prod_{s<=t} (1 - beta_s), alpha_bar_{-1} = 1) and the sampling timesteps: the uniform skip
``range(0, N, N // T)`` or the quadratic skip ``int(linspace(0, sqrt(0.8 N), T)^2)`` with
its duplicate timesteps removed (so the chain may have fewer than T steps; `num_latents`
says how many). Sampling runs t_0 > t_1 > ... > t_{K-1} (the sequence reversed), each step
going to next_k = t_{k+1} (-1 after the last: x_0).

One DDIM step, with y = x / sqrt(alpha_bar), is linear in eps:
    y_{next_k} = y_{t_k} + d_k eps_theta(x_{t_k}, t_k) + e_k n_k,
    d_k = sqrt(1 - ab_next - s_k^2) / sqrt(ab_next) - sqrt(1 - ab_t) / sqrt(ab_t),
    e_k = s_k / sqrt(ab_next),   s_k = eta sqrt((1 - ab_t / ab_next)(1 - ab_next)/(1 - ab_t)),
so the whole chain is x_{next_k} = sqrt(ab_{next_k}) [x_T / sqrt(ab_{t_0}) + sum_{j<=k} (d_j eps_j + e_j n_j)]:
the trajectory (x_{next_0}, ..., x_{next_{K-1}} = x_0) is the fixed point of `JointDDIM`,
which evaluates the denoiser on all K latents at once. eta = 0 is DDIM; eta > 0 its
stochastic variant, with the noise n (B, K, C, H, W) drawn once up front.
x_T is an input of the map, not a state slot: a slot that copies x_T would put a
unit eigenvalue in J_f (it maps to itself) and make I - J singular for the backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # sampling.dtype, sampling_study.dtypes

__all__ = ["Schedule", "timestep_sequence", "JointDDIM", "ddim_sample", "ddim_encode", "q_sample", "ddpm_loss"]


def timestep_sequence(num_steps: int, timesteps: int, skip_type: str) -> list[int]:
    """The ascending timesteps the sampler visits (duplicates of the quadratic skip removed)."""
    if not 1 <= timesteps <= num_steps:
        raise ValueError(f"sampling.timesteps={timesteps}: must be in 1..{num_steps}")
    if skip_type == "uniform":
        seq = list(range(0, num_steps, num_steps // timesteps))
    elif skip_type == "quad":
        seq = (np.linspace(0, math.sqrt(num_steps * 0.8), timesteps) ** 2).astype(int).tolist()
    else:
        raise ValueError(f"sampling.skip_type={skip_type!r}: use uniform or quad")
    return sorted(set(seq))


@dataclass
class Schedule:
    """Linear betas, alpha_bar and the sampling chain of one configuration (float64 on the host)."""

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_steps: int = 1000
    timesteps: int = 50
    skip_type: str = "uniform"
    eta: float = 0.0

    def __post_init__(self):
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"diffusion betas {self.beta_start}..{self.beta_end}: need 0 < start <= end < 1")
        if self.eta < 0:
            raise ValueError(f"sampling.eta={self.eta}: must be >= 0")
        self.betas = np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
        self.alpha_bar = np.cumprod(1.0 - self.betas)
        seq = timestep_sequence(self.num_steps, self.timesteps, self.skip_type)
        self.t = np.array(seq[::-1], dtype=np.int64)                 # t_0 > ... > t_{K-1}
        self.next = np.array(seq[::-1][1:] + [-1], dtype=np.int64)   # next_k (-1: x_0)
        ab_t, ab_n = self.ab(self.t), self.ab(self.next)
        sigma = self.eta * np.sqrt((1 - ab_t / ab_n) * (1 - ab_n) / (1 - ab_t))
        self.sigma = sigma
        self.d = np.sqrt(1 - ab_n - sigma ** 2) / np.sqrt(ab_n) - np.sqrt(1 - ab_t) / np.sqrt(ab_t)
        self.e = sigma / np.sqrt(ab_n)
        self.sqrt_ab_t0 = math.sqrt(ab_t[0])
        self.sqrt_ab_next = np.sqrt(ab_n)

    @classmethod
    def from_config(cls, cfg, timesteps: Optional[int] = None) -> "Schedule":
        """From ``cfg.diffusion`` and ``cfg.sampling``; `timesteps` overrides ``sampling.timesteps``."""
        d, s = cfg.diffusion, cfg.sampling
        return cls(beta_start=float(d.beta_start), beta_end=float(d.beta_end), num_steps=int(d.num_steps),
                   timesteps=int(timesteps or s.timesteps), skip_type=str(s.skip_type),
                   eta=float(s.get("eta", 0.0)))

    def ab(self, t: np.ndarray) -> np.ndarray:
        """alpha_bar at integer timesteps, alpha_bar_{-1} = 1."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alpha_bar[np.clip(t, 0, None)], 1.0)

    @property
    def num_latents(self) -> int:
        """K, the number of sampling steps (= latents in the joint state)."""
        return len(self.t)

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A per-step coefficient as a (K, 1, 1, 1) tensor of like's dtype and device."""
        return torch.as_tensor(getattr(self, name), dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)

    def noise(self, x_T: torch.Tensor, generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
        """The stochastic variant's noise (B, K, C, H, W), drawn once (None for eta = 0)."""
        if self.eta == 0:
            return None
        shape = (x_T.shape[0], self.num_latents, *x_T.shape[1:])
        return torch.randn(shape, generator=generator, dtype=x_T.dtype).to(x_T.device)


def _eps_chunked(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:
    """denoiser on the rows of x (N, C, H, W) in chunks of at most `chunk` rows (0: all at once)."""
    if chunk <= 0 or x.shape[0] <= chunk:
        return denoiser(x, t)
    return torch.cat([denoiser(xs, ts) for xs, ts in zip(x.split(chunk), t.split(chunk))])


class JointDDIM:
    """The joint map f(trajectory; x_T) whose fixed point is the DDIM trajectory.

    The state is (B, K, C, H, W): slot k holds x_{next_k}, so slot K-1 is x_0. The denoiser
    sees x_T for slot 0 and slot k-1 for slot k, all B*K latents in one batch (in chunks
    of `chunk` latents to bound memory; 0 = one call), and the trajectory is rebuilt by a
    cumulative sum. `calls` counts the map's evaluations (each = B*K denoiser latents).
    """

    def __init__(self, denoiser: Denoiser, schedule: Schedule, chunk: int = 0):
        self.denoiser, self.schedule, self.chunk = denoiser, schedule, int(chunk)
        self.calls = 0

    def initial_state(self, x_T: torch.Tensor) -> torch.Tensor:
        """Every slot = x_T (upstream's initialisation), (B, K, C, H, W)."""
        return x_T.detach().unsqueeze(1).expand(-1, self.schedule.num_latents, *x_T.shape[1:]).contiguous()

    def __call__(self, traj: torch.Tensor, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = self.schedule
        b, k = traj.shape[:2]
        self.calls += 1
        inputs = torch.cat([x_T.unsqueeze(1), traj[:, :-1]], dim=1)                  # x_{t_k}
        t = torch.as_tensor(s.t, device=traj.device).repeat(b)
        eps = _eps_chunked(self.denoiser, inputs.reshape(b * k, *traj.shape[2:]), t, self.chunk)
        incr = s.tensor("d", traj) * eps.reshape(traj.shape)
        if noise is not None:
            incr = incr + s.tensor("e", traj) * noise
        y = x_T.unsqueeze(1) / s.sqrt_ab_t0 + incr.cumsum(dim=1)
        return s.tensor("sqrt_ab_next", traj) * y


def ddim_sample(denoiser: Denoiser, schedule: Schedule, x_T: torch.Tensor,
                noise: Optional[torch.Tensor] = None, keep_trajectory: bool = False):
    """The sequential sampler: K denoiser calls of B latents. Returns x_0, or the trajectory
    (B, K, C, H, W) with `keep_trajectory` (the fixed point `JointDDIM` should reach)."""
    s = schedule
    x, out = x_T, []
    for k in range(s.num_latents):
        t = torch.full((x.shape[0],), int(s.t[k]), device=x.device, dtype=torch.long)
        y = x / math.sqrt(s.ab(s.t[k])) + float(s.d[k]) * denoiser(x, t)
        if noise is not None:
            y = y + float(s.e[k]) * noise[:, k]
        x = float(s.sqrt_ab_next[k]) * y
        if keep_trajectory:
            out.append(x)
    return torch.stack(out, dim=1) if keep_trajectory else x


def ddim_encode(denoiser: Denoiser, schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T (the chain run backwards with eps at the
    current point): the initial latent of an inversion, as upstream."""
    s = schedule
    x = x0
    ts = s.t[::-1]  # ascending
    prev = np.concatenate([[-1], ts[:-1]])
    for t_prev, t in zip(prev, ts):
        ab_p, ab = float(s.ab(t_prev)), float(s.ab(t))
        tt = torch.full((x.shape[0],), int(max(t_prev, 0)), device=x.device, dtype=torch.long)
        eps = denoiser(x, tt)
        x0_pred = (x - math.sqrt(1 - ab_p) * eps) / math.sqrt(ab_p)
        x = math.sqrt(ab) * x0_pred + math.sqrt(1 - ab) * eps
    return x


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise."""
    ab = torch.as_tensor(schedule.alpha_bar, dtype=x0.dtype, device=x0.device)[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def ddpm_loss(denoiser: Denoiser, schedule: Schedule, x0: torch.Tensor,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The DDPM training loss: mean squared error of the predicted noise at a random t."""
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    return (denoiser(q_sample(schedule, x0, t, noise), t) - noise).pow(2).mean()
