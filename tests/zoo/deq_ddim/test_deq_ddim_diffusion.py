"""The DDIM chain as one fixed point: schedules, the joint map against the sequential
sampler, chunking, and the gradient w.r.t. x_T through the DEQ (IFT) against backprop."""
import math

import numpy as np
import pytest
import torch

from core.solvers import anderson, fixed_point_iter
from zoo.deq_ddim.diffusion import JointDDIM, Schedule, ddim_sample, timestep_sequence
from zoo.deq_ddim.inversion import sse
from zoo.deq_ddim.sampler import DEQSampler

F64 = torch.float64


def test_timestep_sequences():
    assert timestep_sequence(1000, 10, "uniform") == list(range(0, 1000, 100))
    quad = timestep_sequence(1000, 1000, "quad")
    raw = (np.linspace(0, math.sqrt(800), 1000) ** 2).astype(int)
    assert quad == sorted(set(raw.tolist())) and len(quad) == 688 < 1000  # duplicates removed
    assert quad[0] == 0 and quad[-1] == 800
    s = Schedule(timesteps=20, skip_type="quad")
    assert s.t[0] == 800 and s.next[-1] == -1 and list(s.next[:-1]) == list(s.t[1:])
    with pytest.raises(ValueError, match="skip_type"):
        timestep_sequence(1000, 10, "cosine")


def test_schedule_alpha_bar_and_one_ddim_step(toy_denoiser):
    """alpha_bar is the product of (1 - beta); one sequential step is the textbook DDIM
    update sqrt(ab') x0_pred + sqrt(1 - ab' - s^2) eps + s n, for eta 0 and 0.7."""
    den = toy_denoiser()
    for eta in (0.0, 0.7):
        s = Schedule(timesteps=4, skip_type="uniform", eta=eta)
        betas = np.linspace(1e-4, 0.02, 1000)
        assert s.alpha_bar[417] == pytest.approx(np.prod(1 - betas[:418]), rel=1e-12)
        x = torch.randn(2, 1, 4, 4, dtype=F64)
        noise = torch.randn(2, s.num_latents, 1, 4, 4, dtype=F64)
        traj = ddim_sample(den, s, x, noise if eta else None, keep_trajectory=True)
        t, nxt = int(s.t[0]), int(s.next[0])
        ab, ab_n = s.alpha_bar[t], s.alpha_bar[nxt]
        eps = den(x, torch.full((2,), t))
        x0_pred = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        sigma = eta * math.sqrt((1 - ab / ab_n) * (1 - ab_n) / (1 - ab))
        expected = math.sqrt(ab_n) * x0_pred + math.sqrt(1 - ab_n - sigma ** 2) * eps
        if eta:
            expected = expected + sigma * noise[:, 0]
        torch.testing.assert_close(traj[:, 0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_joint_fixed_point_is_the_sequential_trajectory(toy_denoiser, eta):
    den = toy_denoiser()
    s = Schedule(timesteps=25, skip_type="quad", eta=eta)
    x_T = torch.randn(3, 1, 4, 4, dtype=F64)
    noise = s.noise(x_T, torch.Generator().manual_seed(1))
    seq = ddim_sample(den, s, x_T, noise, keep_trajectory=True)
    joint = JointDDIM(den, s)
    f = lambda z: joint(z, x_T, noise)
    with torch.no_grad():
        # The Jacobian is block lower-triangular (nilpotent): K plain iterations are exact.
        z, _, _ = fixed_point_iter(f, joint.initial_state(x_T), max_iter=s.num_latents, tol=1e-300,
                                   return_final=True)
        assert (z - seq).abs().max() < 1e-10
        assert (f(seq) - seq).abs().max() < 1e-12  # the trajectory is a fixed point
        z, _, info = anderson(f, joint.initial_state(x_T), max_iter=40, tol=1e-12, m=5, lam=1e-3)
        assert (z - seq).abs().max() < 1e-10
        assert float(info["nstep"].max()) < s.num_latents + 15


def test_chunked_and_unchunked_maps_agree(toy_denoiser):
    den = toy_denoiser()
    s = Schedule(timesteps=10, skip_type="uniform", eta=0.3)
    x_T = torch.randn(3, 1, 4, 4, dtype=F64)
    noise = s.noise(x_T, torch.Generator().manual_seed(2))
    z = torch.randn(3, s.num_latents, 1, 4, 4, dtype=F64)
    whole = JointDDIM(den, s, chunk=0)(z, x_T, noise)
    for chunk in (1, 7, 29, 30):
        torch.testing.assert_close(JointDDIM(den, s, chunk=chunk)(z, x_T, noise), whole, rtol=0, atol=1e-13)


@pytest.mark.parametrize("mix", ["image", "slot"])
def test_ift_gradient_wrt_x_T_matches_backprop_through_the_sequential_sampler(toy_denoiser, mix):
    den = toy_denoiser()
    s = Schedule(timesteps=12, skip_type="uniform")
    x_T = torch.randn(2, 1, 4, 4, dtype=F64, requires_grad=True)
    target = torch.randn(2, 1, 4, 4, dtype=F64)
    (g_seq,) = torch.autograd.grad(sse(ddim_sample(den, s, x_T), target).sum(), x_T)
    options = dict(f_solver="anderson", f_max_iter=60, f_tol=1e-13, f_stop_mode="abs",
                   f_solver_kwargs={"m": 5, "lam": 1e-3}, ift=True, b_solver="fixed_point_iter",
                   b_max_iter=40, b_tol=1e-13)
    sampler = DEQSampler(den, s, options, mix=mix).train()
    traj, _ = sampler.sample(x_T)
    (g_deq,) = torch.autograd.grad(sse(traj[:, -1], target).sum(), x_T)
    assert float((g_deq - g_seq).norm() / g_seq.norm()) < 1e-6


def test_x_T_as_a_state_slot_makes_I_minus_J_singular(toy_denoiser):
    """Upstream's inversion keeps x_T in slot 0 of the state (f copies it): J_f then has
    an identity block, so I - J is singular and the implicit backward ill-posed. With
    x_T an input of f (ours), I - J is unit lower-triangular: invertible."""
    den = toy_denoiser(dim=4)
    s = Schedule(timesteps=3, skip_type="uniform")
    x_T = torch.randn(1, 1, 2, 2, dtype=F64)
    joint = JointDDIM(den, s)
    traj = ddim_sample(den, s, x_T, keep_trajectory=True)

    def ours(z):
        return joint(z.reshape(traj.shape), x_T).flatten()

    def slotted(z):  # [x_T, trajectory] -> [x_T (copied), f(trajectory; x_T)]
        xt, rest = z[:4].reshape(x_T.shape), z[4:].reshape(traj.shape)
        return torch.cat([xt.flatten(), joint(rest, xt).flatten()])

    eye = lambda n: torch.eye(n, dtype=F64)
    j_ours = torch.autograd.functional.jacobian(ours, traj.flatten())
    j_slot = torch.autograd.functional.jacobian(slotted, torch.cat([x_T.flatten(), traj.flatten()]))
    assert abs(float(torch.linalg.det(eye(len(j_ours)) - j_ours)) - 1.0) < 1e-9
    assert float(torch.linalg.svdvals(eye(len(j_slot)) - j_slot).min()) < 1e-12
