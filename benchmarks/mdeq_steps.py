"""MDEQ training-step time and peak memory on synthetic CIFAR-sized batches.

    python benchmarks/mdeq_steps.py --size tiny --batch 128 --steps 300        # cifar_tiny recipe
    python benchmarks/mdeq_steps.py --size large --batch 128 --steps 100 --iters 18 --tau 0.7

Runs the cifar_tiny / cifar_large recipe's DEQ (broyden forward, phantom-gradient
backward, weight norm, fixed-point-correction loss, SGD 0.1) on random normalised 32x32
images, so it needs neither CIFAR nor Hydra. Prints one JSON line: mean seconds per
training step after a warm-up, test-mode forward time, peak memory, solver statistics.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from core.reg.fp_correction import fp_correction
from zoo.mdeq.model import MDEQ, count_parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--solver", default="broyden")
    p.add_argument("--iters", type=int, default=22)
    p.add_argument("--grad", type=int, default=5)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = MDEQ(a.size, deq={"f_solver": a.solver, "f_max_iter": a.iters, "grad": a.grad,
                              "tau": a.tau, "norm_type": "weight_norm"}).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(a.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (a.batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0 = [], None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
        logits, info = model(x)
        loss = fp_correction(F.cross_entropy, (logits, y), gamma=0.8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            losses.append(round(loss.item(), 4))
    sync()
    step_s = (time.perf_counter() - t0) / a.steps
    model.eval()
    with torch.no_grad():
        model(x)
        sync()
        t1 = time.perf_counter()
        for _ in range(10):
            _, eval_info = model(x)
        sync()
    eval_s = (time.perf_counter() - t1) / 10
    print(json.dumps({
        "size": a.size, "params": count_parameters(model), "batch": a.batch, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "solver": a.solver, "f_max_iter": a.iters, "grad": a.grad, "tau": a.tau,
        "train_step_s": round(step_s, 4), "eval_forward_s": round(eval_s, 4),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "train_rel_residual": float(info["rel_lowest"].mean()), "eval_rel_residual": float(eval_info["rel_lowest"].mean()),
        "loss_every_50_steps": losses, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
