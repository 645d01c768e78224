"""DEQ-Flow training-step time and peak memory on synthetic FlyingChairs-like pairs.

    python benchmarks/deq_flow_steps.py --size B --batch 12 --crop 368 496 --steps 300     # chairs recipe, GPU
    python benchmarks/deq_flow_steps.py --size cpu --batch 4 --crop 128 128 --steps 10 --iters 8 --states 2

Runs the `chairs` recipe's DEQ (fixed-point iteration, `--states` slices with a 1-step
phantom gradient, fixed-point-correction loss over the sampled flows, AdamW 4e-4, clip 1)
on `zoo.deq_flow.synthetic.SyntheticFlow` pairs (pre-rendered, so data costs nothing),
without datasets or Hydra. Prints one JSON line: seconds per training step after a
warm-up, peak memory, solver statistics.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from step_options import add_device_options, start
from zoo.deq_flow.metrics import flow_loss
from zoo.deq_flow.model import DEQFlow, count_parameters
from zoo.deq_flow.synthetic import SyntheticFlow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="B")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--crop", type=int, nargs=2, default=(368, 496))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=36)
    p.add_argument("--states", type=int, default=6)
    add_device_options(p)
    a = p.parse_args()
    device = start(a)
    model = DEQFlow(a.size, deq={"f_solver": "fixed_point_iter", "f_max_iter": a.iters, "n_states": a.states,
                                 "grad": 1}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=1e-4, eps=1e-8)
    pairs = SyntheticFlow(a.batch, size=tuple(a.crop), seed=0)
    img1, img2, flow, valid = (torch.stack(t).to(device) for t in zip(*[pairs[i] for i in range(a.batch)]))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0, info = [], None, {}
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
        flows, info, _ = model(img1, img2)
        loss = flow_loss(flows, flow, valid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    sync()
    step_s = (time.perf_counter() - t0) / max(a.steps, 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({
        "size": a.size, "params": count_parameters(model), "batch": a.batch, "crop": list(a.crop),
        "iters": a.iters, "states": a.states, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "step_s": round(step_s, 4), "peak_mb": round(peak, 1) if peak else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "nstep": float(torch.as_tensor(info.get("nstep", torch.zeros(1))).float().mean()),
    }))


if __name__ == "__main__":
    main()
