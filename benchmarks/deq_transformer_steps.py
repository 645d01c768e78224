"""DEQ Transformer training-step time and peak memory on random token streams.

    python benchmarks/deq_transformer_steps.py --size deq_lm --recipe final --batch 14 --tgt-len 150
    python benchmarks/deq_transformer_steps.py --size deq_seq --recipe ift --batch 14 --tgt-len 150
    python benchmarks/deq_transformer_steps.py --size mini --recipe mini --batch 32 --tgt-len 64 --vocab 14467 \\
        --cutoffs 2000 6000 --threads 1                                       # the wiki_mini step

Recipes: ``final`` (12-step unrolled phantom gradient from zero, mem_gc), ``ift`` (Broyden
forward and backward, 35 steps, rel 1e-3), ``ift_jr`` (ift plus the Jacobian term on every
step), ``mini`` (wiki_mini: 2 fixed-point steps then a 2-step phantom gradient). Memory of
``--mem-len`` past states is carried between steps as in training; Adam 2.5e-4, clip 0.25.
Prints one JSON line: seconds per training step after a warm-up, peak memory, parameters.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from step_options import add_device_options, start
from core.reg.jacobian import jac_loss
from zoo.deq_transformer.model import WT103_CUTOFFS, WT103_VOCAB, DEQTransformerLM, count_parameters, get_size
from zoo.deq_transformer.train import lm_loss

RECIPES = {
    "final": {"f_solver": "fixed_point_iter", "f_max_iter": 0, "grad": 12, "eval_f_max_iter": 12},
    "ift": {"f_solver": "broyden", "b_solver": "broyden", "f_max_iter": 35, "b_max_iter": 35, "ift": True,
            "f_stop_mode": "rel", "b_stop_mode": "rel", "f_tol": 1e-3, "b_tol": 1e-3},
    "mini": {"f_solver": "fixed_point_iter", "f_max_iter": 2, "grad": 2, "f_stop_mode": "rel"},
}
RECIPES["ift_jr"] = {**RECIPES["ift"], "jac_loss_weight": 0.1, "jac_loss_freq": 1.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="deq_lm")
    p.add_argument("--recipe", default="final", choices=sorted(RECIPES))
    p.add_argument("--variant", default=None, choices=["lm", "seq"],
                   help="block type override: seq is deq-seq's post-LN block (what Broyden + IFT trains)")
    p.add_argument("--batch", type=int, default=14)
    p.add_argument("--tgt-len", type=int, default=150)
    p.add_argument("--mem-len", type=int, default=150)
    p.add_argument("--vocab", type=int, default=WT103_VOCAB)
    p.add_argument("--cutoffs", type=int, nargs="*", default=list(WT103_CUTOFFS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    add_device_options(p)
    a = p.parse_args()
    device = start(a)
    deq = {**RECIPES[a.recipe], "norm_type": "weight_norm"}
    size = get_size(a.size, variant=a.variant, pre_lnorm=False if a.variant == "seq" else None)
    model = DEQTransformerLM(size, a.vocab, a.cutoffs, deq=deq, mem_len=a.mem_len,
                             mem_gc=a.recipe == "final").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)
    # Zipf-like token ids, so every adaptive-softmax cluster is visited as in text
    weights = 1.0 / torch.arange(1, a.vocab + 1, dtype=torch.float)
    tokens = torch.multinomial(weights, a.batch * (a.tgt_len + 1) * (a.steps + a.warmup), replacement=True)
    tokens = tokens.view(a.steps + a.warmup, a.batch, a.tgt_len + 1).to(device)
    mems, times = None, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(a.steps + a.warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.amp == "bf16"):
            nlls, mems, info = model(tokens[i, :, :-1], tokens[i, :, 1:], mems)
            loss = lm_loss(nlls, 0.8)
            if a.recipe == "ift_jr":
                f, z = model.last_equilibrium()
                loss = loss + jac_loss(deq, f, z, step=i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"size": a.size, "variant": size.variant, "recipe": a.recipe, "batch": a.batch,
                      "tgt_len": a.tgt_len, "mem_len": a.mem_len, "device": str(device), "amp": a.amp, "params": count_parameters(model),
                      "step_s": sum(times) / len(times), "peak_gb": round(peak, 3),
                      "loss": float(loss.detach()), "nstep": float(info["nstep"].float().mean())}))


if __name__ == "__main__":
    main()
