"""DEQ-DDIM cost: sequential DDIM against the joint fixed point, and one inversion step each way.

    python benchmarks/deq_ddim_steps.py --size cifar10 --timesteps 1000 --skip quad --device cuda
    python benchmarks/deq_ddim_steps.py --size digits --timesteps 100 --threads 1      # CPU

Random weights (the cost does not depend on them). Prints, as one JSON line: the
sequential sampler's time, the joint map's time per solver iteration (one denoiser call
on all K latents, in chunks of --chunk), the peak memory of each, and one inversion Adam
step through the DEQ (--iters Anderson iterations + the 1-step phantom gradient) and
through the sequential sampler.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zoo.deq_ddim.diffusion import JointDDIM, Schedule, ddim_sample
from zoo.deq_ddim.inversion import deq_forward, sequential_forward, sse
from zoo.deq_ddim.model import build_unet, count_parameters
from zoo.deq_ddim.sampler import DEQSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1) -> tuple[float, float]:
    """(mean seconds, peak memory MB on CUDA, else None) of `fn()`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    dt = (time.perf_counter() - t0) / repeat
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="digits", choices=["digits", "cifar10"])
    ap.add_argument("--timesteps", type=int, default=100)
    ap.add_argument("--skip", default="uniform", choices=["uniform", "quad"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--iters", type=int, default=15, help="Anderson iterations per DEQ solve")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-inversion", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_unet(args.size, dropout=0.0).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    s = Schedule(timesteps=args.timesteps, skip_type=args.skip)
    size = model.size
    x_T = torch.randn(args.batch, size.in_channels, size.resolution, size.resolution, device=device)
    out = {"size": args.size, "params": count_parameters(model), "T": args.timesteps, "latents": s.num_latents,
           "batch": args.batch, "chunk": args.chunk, "device": str(device), "threads": torch.get_num_threads()}
    with torch.no_grad():
        joint = JointDDIM(model, s, chunk=args.chunk)
        z = joint.initial_state(x_T)
        joint(z, x_T)  # warm-up
        out["joint_iter_s"], out["joint_iter_peak_mb"] = timed(lambda: joint(z, x_T), device)
        out["sequential_s"], out["sequential_peak_mb"] = timed(lambda: ddim_sample(model, s, x_T), device)
    out["anderson_solve_s_est"] = out["joint_iter_s"] * args.iters
    if not args.no_inversion:
        options = dict(f_solver="anderson", f_max_iter=args.iters, f_tol=1e-30, f_solver_kwargs={"m": 5, "lam": 1e-3},
                       grad=1, tau=0.1)
        target = torch.rand_like(x_T) * 2 - 1
        for name, forward in (("deq", deq_forward(DEQSampler(model, s, options, chunk=args.chunk))),
                              ("sequential", sequential_forward(model, s))):
            x = x_T.clone().requires_grad_(True)

            def step():
                x0, _ = forward(x)
                sse(x0, target).sum().backward()

            out[f"inversion_{name}_step_s"], out[f"inversion_{name}_peak_mb"] = timed(step, device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
