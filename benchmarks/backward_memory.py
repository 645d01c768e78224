"""Peak memory and time of one DEQ training step for each backward pass.

Model: the solver race's conv cell (`benchmarks/solver_race.py`'s ConvCell),
f(z) = GroupNorm(ReLU(conv3x3(z) + u)), 32 channels, 16x16, batch 16, with
u = conv3x3(image) an injection that has parameters. One training
step = DEQ forward + loss + backward. Settings:

- IFT (`ift=True`, fixed_point_iter forward, 20 backward steps), f_max_iter 10 / 40 / 160
- unrolled BPTT (`f_max_iter=0, grad=K, tau=1`), K = 10 / 40 / 160
- unrolled with `mem_gc` around each step, K = 10 / 40 / 160 (+ time ratio vs unrolled,
  the two timed alternately in one process)
- the IFT step against TorchDEQ's IFT on the same model and settings, timed alternately in
  one process (ratio ours / TorchDEQ).

Tolerances are set out of reach so every setting runs exactly its number of steps.

Memory, each setting in a fresh subprocess: on CPU the peak RSS of the process (VmHWM)
and its rise during the measured step (glibc's MALLOC_MMAP_THRESHOLD_=65536 makes freed
large blocks return to the OS, and the peak is reset through /proc/self/clear_refs after
a warm-up step); on CUDA `torch.cuda.max_memory_allocated` and its rise over the
allocation before the step. Time, each setting in another fresh subprocess with the
default allocator: the median of `--repeats` steps after a warm-up step.

    python benchmarks/backward_memory.py                 # CPU, markdown table
    python benchmarks/backward_memory.py --device cuda   # GPU
    python benchmarks/backward_memory.py --json out.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BATCH, CHANNELS, SIZE, B_MAX_ITER = 16, 32, 16, 20
UNREACHABLE = 1e-30  # a tolerance no solve reaches: fixed step counts


# ------------------------------------------------------------------------ the model
def build(device):
    """The solver race's conv cell (its ConvCell), an injection conv and an image batch."""
    import torch
    from torch import nn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from solver_race import ConvCell

    torch.manual_seed(0)
    cell = ConvCell(CHANNELS).to(device)
    inject = nn.Conv2d(3, CHANNELS, 3, padding=1).to(device)
    image = torch.randn(BATCH, 3, SIZE, SIZE, device=device)
    return cell, inject, image


def make_step(mode, k, device):
    """A closure running one training step of `mode` with k steps, and the parameters it trains."""
    import torch

    cell, inject, image = build(device)
    params = list(cell.parameters()) + list(inject.parameters())
    if mode == "torchdeq_ift":
        import torchdeq

        deq = torchdeq.get_deq(ift=True, f_max_iter=k, f_tol=UNREACHABLE, b_max_iter=B_MAX_ITER, b_tol=UNREACHABLE)
    else:
        from core.deq import get_deq

        if mode == "ift":
            deq = get_deq(ift=True, f_max_iter=k, f_tol=UNREACHABLE, b_max_iter=B_MAX_ITER, b_tol=UNREACHABLE)
        else:
            deq = get_deq(f_max_iter=0, grad=k, tau=1.0)
    if mode == "unrolled_gc":
        from core.utils.mem_gc import mem_gc

    def step():
        u = inject(image)
        if mode == "unrolled_gc":
            f = lambda z: mem_gc(cell, (z, u))  # noqa: E731
        else:
            f = lambda z: cell(z, u)  # noqa: E731
        z_out, _ = deq(f, torch.zeros(BATCH, CHANNELS, SIZE, SIZE, device=device))
        loss = z_out[-1].square().mean()
        loss.backward()
        for p in params:
            p.grad = None

    return step


# ------------------------------------------------------------------------ measuring
def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(mode, k, device):
    """Extra MiB at the peak of one step over the memory before it, and the absolute peak."""
    import torch

    step = make_step(mode, k, device)
    step()  # warm-up: kernels, allocator pools, lazy inits
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": (peak - before) / 2**20, "abs_peak_mib": peak / 2**20}
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    before = _rss_kib("VmRSS:")
    step()
    peak = _rss_kib("VmHWM:")
    return {"peak_mib": (peak - before) / 1024, "abs_peak_mib": peak / 1024}


def measure_time(mode, k, device, repeats):
    """Median seconds of one training step (after a warm-up step).

    For `unrolled_gc` the plain unrolled step is timed alternately in the same process,
    so that their ratio is measured side by side.
    """
    steps = {mode: make_step(mode, k, device)}
    if mode == "unrolled_gc":
        steps["unrolled"] = make_step("unrolled", k, device)
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    _sync(device)
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times[mode])}
    if mode == "unrolled_gc":
        result["ratio_vs_unrolled"] = result["seconds"] / statistics.median(times["unrolled"])
    return result


def compare_with_torchdeq(k, device, rounds):
    """Median step time of our IFT and TorchDEQ's, alternated in one process."""
    ours, theirs = make_step("ift", k, device), make_step("torchdeq_ift", k, device)
    ours(), theirs()
    _sync(device)
    times = {"ours": [], "torchdeq": []}
    for _ in range(rounds):
        for name, step in (("ours", ours), ("torchdeq", theirs)):
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def child(argv):
    args = json.loads(argv)
    warnings.simplefilter("ignore")  # the unreachable b_tol warns by design
    if args["mode"] == "compare":
        result = compare_with_torchdeq(args["k"], args["device"], args["repeats"])
    elif args["what"] == "memory":
        result = measure_memory(args["mode"], args["k"], args["device"])
    else:
        result = measure_time(args["mode"], args["k"], args["device"], args["repeats"])
    print("RESULT " + json.dumps(result))


def run_child(mode, k, device, repeats, what="time"):
    """Run one measurement in a fresh interpreter; memory ones with the fixed mmap threshold."""
    env = dict(os.environ, WANDB_MODE="offline")
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    spec = json.dumps({"mode": mode, "k": k, "device": device, "repeats": repeats, "what": what})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], env=env,
                         capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="10,40,160", help="f_max_iter / grad values")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per setting (median)")
    parser.add_argument("--compare-iter", type=int, default=40, help="f_max_iter of the TorchDEQ comparison")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of the TorchDEQ comparison")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    import torch

    steps = [int(s) for s in args.steps.split(",")]
    results = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "batch": BATCH, "channels": CHANNELS, "size": SIZE, "b_max_iter": B_MAX_ITER, "rows": []}
    state_mib = BATCH * CHANNELS * SIZE * SIZE * 4 / 2**20
    for mode in ("ift", "unrolled", "unrolled_gc"):
        for k in steps:
            r = dict(run_child(mode, k, args.device, 0, what="memory"), **run_child(mode, k, args.device, args.repeats))
            results["rows"].append(dict(mode=mode, k=k, **r))
            print(f"{mode:12s} k={k:4d}  peak +{r['peak_mib']:7.1f} MiB (process {r['abs_peak_mib']:7.1f} MiB)  "
                  f"step {r['seconds'] * 1e3:8.1f} ms", flush=True)
    if importlib.util.find_spec("torchdeq") is not None:
        compare = run_child("compare", args.compare_iter, args.device, args.rounds)
        results["torchdeq"] = dict(compare, f_max_iter=args.compare_iter, ratio=compare["ours"] / compare["torchdeq"])

    rows = {(r["mode"], r["k"]): r for r in results["rows"]}
    print(f"\nOne training step, conv cell {CHANNELS}ch {SIZE}x{SIZE} batch {BATCH} on {args.device} "
          f"(state = {state_mib:.2f} MiB); peak = extra memory during the step\n")
    peak_name = "peak allocated MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"| backward | steps | extra MiB in the step | MiB per extra step | {peak_name} | step ms | time vs unrolled |")
    print("|---|---|---|---|---|---|---|")
    for mode, label in (("ift", "IFT (f_max_iter)"), ("unrolled", "unrolled (grad)"), ("unrolled_gc", "unrolled + mem_gc")):
        for i, k in enumerate(steps):
            r = rows[(mode, k)]
            growth = ""
            if i:
                prev = rows[(mode, steps[i - 1])]
                growth = f"{(r['peak_mib'] - prev['peak_mib']) / (k - steps[i - 1]):.3f}"
            ratio = f"{r['ratio_vs_unrolled']:.2f}x" if mode == "unrolled_gc" else ""
            print(f"| {label} | {k} | {r['peak_mib']:.1f} | {growth} | {r['abs_peak_mib']:.1f} | "
                  f"{r['seconds'] * 1e3:.1f} | {ratio} |")
    t = results.get("torchdeq")
    if t is None:
        print("\nTorchDEQ is not installed (pip install -e '.[bench]'): no IFT comparison")
    else:
        print(f"\nIFT step, f_max_iter {t['f_max_iter']}, b_max_iter {B_MAX_ITER}: ours {t['ours'] * 1e3:.1f} ms, "
              f"TorchDEQ {t['torchdeq'] * 1e3:.1f} ms, ratio ours/TorchDEQ = {t['ratio']:.2f} "
              f"(median of {args.rounds} alternated rounds, one process)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
