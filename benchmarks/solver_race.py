"""Solver race: core's solvers against TorchDEQ 0.1.0's on the same problems, side by side.

For each problem and solver (fixed_point_iter, anderson, broyden) both libraries solve
the same fixed point from the same start, interleaved in one process and repeated
(median time). Printed per row: wall time, core / TorchDEQ speed-up, `func` calls, the
largest residual ||f(z) - z|| of the returned states (recomputed, not the solver's own
report), and overhead = time outside `func` / time inside `func` (0 is the limit: all
time spent in the model). `func` is timed by a wrapper (with `torch.cuda.synchronize`
around it on CUDA).

Problems: a dense tanh layer (d=1024, batch 64, ||W||_2 = 0.95), a conv3x3 + ReLU +
GroupNorm cell (32 channels, 16x16, batch 16) and a small tanh layer (d=32, batch 512)
whose cost is dominated by solver overhead. `--compile` adds, for the last one, rows for
core's sync-free solvers compiled whole with `torch.compile(fullgraph=True)` (run for
the number of steps eager core needed; overhead cannot be split inside a compiled graph).

    python benchmarks/solver_race.py [--device cuda] [--compile] [--out results.json]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.solvers import get_solver  # noqa: E402

SOLVERS = ("fixed_point_iter", "anderson", "broyden")


class TimedFunc:
    """Wraps func: counts calls and accumulates the wall time spent inside it."""

    def __init__(self, func, device):
        self.func = func
        self.cuda = device.type == "cuda"
        self.calls = 0
        self.seconds = 0.0

    def reset(self):
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, z):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.func(z)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def tanh_layer(dim, batch, device, seed):
    """z -> tanh(W z + x) with ||W||_2 = 0.95."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen)
    w = (0.95 * w / torch.linalg.matrix_norm(w, 2)).to(device)
    x = torch.randn(batch, dim, generator=gen).to(device)

    def func(z):
        return torch.tanh(torch.addmm(x, z, w.T))

    return func, torch.zeros(batch, dim, device=device)


class ConvCell(nn.Module):
    """z -> GroupNorm(ReLU(conv3x3(z) + x)): a small MDEQ-like residual cell."""

    def __init__(self, channels=32, groups=8, scale=0.5):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        with torch.no_grad():
            self.conv.weight.mul_(scale / self._lipschitz_bound())

    def _lipschitz_bound(self):
        w = self.conv.weight
        return w.flatten(1).norm(dim=1).max().item() * 3.0  # a rough operator-norm proxy

    def forward(self, z, x):
        return self.norm(F.relu(self.conv(z) + x))


def conv_cell(device, seed, batch=16, channels=32, size=16):
    torch.manual_seed(seed)
    cell = ConvCell(channels).to(device)
    x = torch.randn(batch, channels, size, size, device=device)

    def func(z):
        return cell(z, x)

    return func, torch.zeros(batch, channels, size, size, device=device)


PROBLEMS = {
    "tanh d=1024 b=64": lambda device: tanh_layer(1024, 64, device, 0),
    "conv3x3+ReLU+GN 32ch 16x16 b=16": lambda device: conv_cell(device, 0),
    "tanh d=32 b=512": lambda device: tanh_layer(32, 512, device, 1),
}
OVERHEAD_PROBLEM = "tanh d=32 b=512"


def max_residual(func, z):
    with torch.no_grad():
        return (func(z) - z).flatten(1).norm(dim=1).max().item()


def run_once(solve, timed, x0, device):
    timed.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        z = solve(timed, x0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    return z, total, timed.seconds, timed.calls


def race(args, device):
    import torchdeq.solver as tdeq

    rows = []
    common = dict(max_iter=args.max_iter, tol=args.tol, stop_mode="abs")
    for problem, make in PROBLEMS.items():
        func, x0 = make(device)
        timed = TimedFunc(func, device)
        for name in SOLVERS:
            impls = {
                "core": lambda f, x, n=name: get_solver(n)(f, x, **common)[0],
                "torchdeq": lambda f, x, n=name: tdeq.get_solver(n)(f, x, **common)[0],
            }
            stats = {impl: {"total": [], "inside": []} for impl in impls}
            for rep in range(args.repeats + 1):  # the first round warms up
                for impl, solve in impls.items():
                    z, total, inside, calls = run_once(solve, timed, x0, device)
                    if rep:
                        stats[impl]["total"].append(total)
                        stats[impl]["inside"].append(inside)
                    stats[impl]["calls"] = calls
                    stats[impl]["residual"] = max_residual(func, z)
            row = {"problem": problem, "solver": name}
            for impl in impls:
                total = statistics.median(stats[impl]["total"])
                inside = statistics.median(stats[impl]["inside"])
                row[impl] = {"time_s": total, "func_calls": stats[impl]["calls"],
                             "max_residual": stats[impl]["residual"],
                             "overhead": (total - inside) / inside}
            row["speedup"] = row["torchdeq"]["time_s"] / row["core"]["time_s"]
            rows.append(row)
            print(_format_row(row), flush=True)
        if args.compile and problem == OVERHEAD_PROBLEM:
            for name in ("fixed_point_iter", "anderson"):
                try:
                    row = compiled_row(args, device, func, x0, rows, name)
                except Exception as exc:  # report and go on: the eager rows stand alone
                    print(f"| {problem} | {name} (sync-free, compiled) | compile failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]} |", flush=True)
                    continue
                rows.append(row)
                print(_format_row(row), flush=True)
    return rows


def compiled_row(args, device, func, x0, rows, name):
    """Core's sync-free solver compiled whole, for as many steps as eager core took."""
    eager = next(r for r in rows if r["problem"] == OVERHEAD_PROBLEM and r["solver"] == name)
    steps = eager["core"]["func_calls"]
    solver = get_solver(name)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x: solver(func, x, max_iter=steps, tol=args.tol, sync_free=True)[0],
        fullgraph=True, mode=args.compile_mode)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):  # compile, then (CUDA graphs) record and replay once
            compiled(x0)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            z = compiled(x0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    total = statistics.median(times)
    row = {"problem": OVERHEAD_PROBLEM, "solver": f"{name} (sync-free, compiled)",
           "core": {"time_s": total, "func_calls": steps, "max_residual": max_residual(func, z),
                    "overhead": None, "compile_s": compile_s},
           "torchdeq": eager["torchdeq"]}
    row["speedup"] = row["torchdeq"]["time_s"] / total
    return row


HEADER = ("| problem | solver | core ms | TorchDEQ ms | speed-up | func calls core / TorchDEQ "
          "| max residual core / TorchDEQ | overhead core / TorchDEQ |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")


def _format_row(row):
    core, tdeq = row["core"], row["torchdeq"]
    over = "n/a" if core["overhead"] is None else f"{core['overhead']:.2f}"
    return (f"| {row['problem']} | {row['solver']} | {1e3 * core['time_s']:.1f} | "
            f"{1e3 * tdeq['time_s']:.1f} | {row['speedup']:.2f}x | "
            f"{core['func_calls']} / {tdeq['func_calls']} | "
            f"{core['max_residual']:.1e} / {tdeq['max_residual']:.1e} | "
            f"{over} / {tdeq['overhead']:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="add compiled sync-free rows for the overhead-dominated problem")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) on GPU")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--tol", type=float, default=1e-4, help="abs tolerance (default 1e-4)")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"tol {args.tol} abs, max_iter {args.max_iter}, median of {args.repeats}\n")
    print(HEADER, flush=True)
    rows = race(args, device)
    eager = [r["speedup"] for r in rows if "compiled" not in r["solver"]]
    geomean = math.exp(sum(math.log(s) for s in eager) / len(eager))
    print(f"\ngeometric-mean speed-up over TorchDEQ, {len(eager)} eager cases: {geomean:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                        "threads": torch.get_num_threads(), "tol": args.tol,
                                        "max_iter": args.max_iter, "rows": rows,
                                        "geomean_speedup": geomean}, indent=2))


if __name__ == "__main__":
    main()
