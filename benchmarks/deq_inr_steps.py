"""DEQ-INR training-step time and peak memory: warm-started image steps and video steps.

    python benchmarks/deq_inr_steps.py --size 1L256D --side 512 --steps 20            # camera 512x512
    python benchmarks/deq_inr_steps.py --size 1L2048D --video --coords 65536 --steps 20  # video recipe
    python benchmarks/deq_inr_steps.py --size 1L256D --side 64 --steps 5 --threads 1    # CPU, reduced

Image mode: full batch on a side x side grid of random grey values, the camera recipe
(warm start: step 0 solves up to 100 fixed-point steps, later steps only the 3
phantom-gradient steps), Adam 1e-3; the one-pass network with the same parameters is
timed the same way. Video mode: batches of --coords random (t, row, col) coordinates, a
solve every step (20 fixed-point steps, 2 states x 3 phantom-gradient steps, fixed-point
correction). Prints one JSON line: seconds per step after the first, the first step,
peak memory (CUDA: max allocated; CPU: peak RSS), parameters. With --autograd-injection the
same models are also timed with the injection's plain `nn.Linear` + `chunk` backward (the
one before `CoordinateMap`), interleaved with the default, for the ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from core import fp_correction
from zoo.deq_inr.model import DEQINR, Injection, count_parameters


def autograd_injection(self: Injection, x: torch.Tensor) -> list[torch.Tensor]:
    """Injection.forward through autograd's linear + chunk (siren_like / fourier only)."""
    u = self.x_map(x)
    return list((torch.sin(u) if self.filter != "siren_like" else u).chunk(self.chunks, dim=-1))


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(model, x, y, steps, warm, device):
    """(first step s, mean s of the later steps) of Adam steps on (x, y)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    z, times = None, []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        kwargs = {"f_max_iter": 0} if (warm and z is not None) else None
        out, _, z_new = model(x, z_init=z if warm else None, solver_kwargs=kwargs)
        loss = fp_correction(F.mse_loss, (out, y), gamma=0.8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        z = z_new if warm else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[0], sum(times[1:]) / max(len(times) - 1, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1L256D")
    p.add_argument("--side", type=int, default=256, help="image mode: grid side")
    p.add_argument("--video", action="store_true")
    p.add_argument("--coords", type=int, default=65536, help="video mode: coordinates per batch")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autograd-injection", action="store_true",
                   help="also time the injection's plain autograd backward (interleaved)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    if a.video:
        deq = {"f_max_iter": 20, "f_tol": 1e-6, "f_stop_mode": "rel", "grad": 3, "n_states": 2}
        x = torch.rand(a.coords, 3, device=device) * 2 - 1
        y = torch.rand(a.coords, 3, device=device) * 2 - 1
        scale = 128.0
    else:
        deq = {"f_max_iter": 100, "f_tol": 1e-3, "grad": 3}
        axis = torch.linspace(-1, 1, a.side, device=device)
        x = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        y = torch.rand(len(x), 1, device=device) * 2 - 1
        scale = 256.0 * a.side / 512
    result = {"size": a.size, "mode": "video" if a.video else "image", "coords": len(x),
              "device": str(device), "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    variants = [("deq", False, None), ("one_pass", True, None)]
    if a.autograd_injection:
        variants = [v for name, one_pass in (("deq", False), ("one_pass", True))
                    for v in ((name, one_pass, None), (f"{name}_autograd_injection", one_pass, autograd_injection))]
    for name, one_pass, injection_forward in variants:
        model = DEQINR(x.shape[1], y.shape[1], a.size, input_scale=scale, deq=deq, one_pass=one_pass).to(device)
        if injection_forward is not None:
            model.injection.forward = injection_forward.__get__(model.injection)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        first, step = time_steps(model, x, y, a.steps, warm=not a.video and not one_pass, device=device)
        result[name] = {"first_step_s": round(first, 4), "step_s": round(step, 4),
                        "peak_memory_mb": round(peak_mb(device), 1), "params": count_parameters(model)}
    result["torch"] = torch.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
