"""One DEQ training step and one inference solve: TorchDEQ eager, core eager, core compiled.

A training step is the DEQ forward (solve without autograd + the backward recipe's graph),
a loss, and `backward()`; an inference solve is the DEQ forward in eval mode under
`no_grad`. The three implementations run interleaved in one process, each case the
median of `--repeats` timed runs after warm-up (the compiled one's first calls compile,
timed separately). The DEQ options are the same for all three: `get_deq(f_solver=...,
f_max_iter=..., f_tol=...)` with the default backward (1-step phantom gradient), or
`--ift`. Compiled = `torch.compile(mode=--mode)` (inductor) around the model and the
loss for the training step (`--model-only`: around the model, the loss eager), around
the model for the inference solve; core's solvers take their traceable path under it by
themselves.

Problems: the solver race's three (`solver_race.py`: tanh d=1024 batch 64, the conv cell,
tanh d=32 batch 512, with their weights made parameters) and the digits MDEQ
(`zoo.mdeq`, `+experiment=digits`, batch 64). `--problems` picks some.

    python benchmarks/compile_step.py --threads 2 --problems tanh32 [--solver anderson]

Not a test: nothing is asserted. Printed: ms per case and the ratios core eager /
compiled and TorchDEQ / compiled (> 1: compiled is faster). `--breakdown` splits core's
training step; `--floor` sets the inference solve against its cell alone, `nfe` times; `--ladder`
against hand-written compiled loops that add core's per-step duties one by one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import core  # noqa: E402


class TanhCell(nn.Module):
    """z -> tanh(W z + x), ||W||_2 = 0.95 (the race's layer, W a parameter)."""

    def __init__(self, dim, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=gen)
        self.w = nn.Parameter(0.95 * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z, x):
        return torch.tanh(torch.addmm(x, z, self.w.T))


class RaceModel(nn.Module):
    """A DEQ around a cell f(z, x); returns z*."""

    def __init__(self, cell, deq):
        super().__init__()
        self.cell, self.deq = cell, deq

    def forward(self, x):
        z_out, _ = self.deq(lambda z: self.cell(z, x), torch.zeros_like(x))
        return z_out[-1]


def race_problem(name):
    """(cell, input) of a race problem."""
    if name == "tanh1024":
        gen = torch.Generator().manual_seed(0)
        return TanhCell(1024, 0), torch.randn(64, 1024, generator=gen)
    if name == "tanh32":
        gen = torch.Generator().manual_seed(1)
        return TanhCell(32, 1), torch.randn(512, 32, generator=gen)
    if name == "conv":
        from solver_race import ConvCell

        torch.manual_seed(0)
        return ConvCell(32), torch.randn(16, 32, 16, 16)
    raise ValueError(name)


def mdeq_digits(deq_options):
    """The digits MDEQ with these DEQ options, and a batch of 64 digits-sized inputs."""
    from zoo.common import compose
    from zoo.mdeq.data import build_datasets
    from zoo.mdeq.train import build_model

    def value(v):  # a dict in Hydra's override grammar: {key:value}
        return "{" + ",".join(f"{k}:{x}" for k, x in v.items()) + "}" if isinstance(v, dict) else v

    overrides = ["+experiment=digits"] + [f"deq.{k}={value(v)}" for k, v in deq_options.items()]
    cfg = compose("mdeq", overrides)
    model = build_model(cfg, build_datasets(cfg.data))  # the splits give channels and classes
    return model, torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def build(problem, impl, options):
    """(model, input) for one implementation; the same weights for all three."""
    if problem == "mdeq":
        if impl == "torchdeq":
            return None, None  # the zoo model is built on core only
        return mdeq_digits(options)
    cell, x = race_problem(problem)
    if impl == "torchdeq":
        import torchdeq

        deq = torchdeq.get_deq(**options)
    else:
        deq = core.get_deq(**options)
    return RaceModel(cell, deq), x


def loss_of(out):
    """Mean square of the output: a tensor, (tensor, info), or (list of logits, info),
    MDEQ's, whose last entry is the best state's."""
    out = out[0] if isinstance(out, tuple) else out
    out = out[-1] if isinstance(out, list) else out
    return out.float().square().mean()


def make_cases(problem, options, mode, check_every=None, inductor_options=None, model_only=False):
    """{impl: (train_step, infer, train_forward)} closures (train_forward: the train-mode
    forward alone, grad on, no backward); `check_every`: the compiled solve's steps per
    while-loop iteration (None: core's default); `inductor_options`: torch.compile's
    ``options`` (e.g. ``{"cpp_wrapper": True}``). The compiled training step compiles the
    model and the loss in one graph, or the model alone with `model_only` (the loss and
    its backward nodes then run eagerly around it)."""
    # Each problem compiles as in a fresh process: dynamo would otherwise recompile the
    # shared code (RaceModel.forward, the loss) with dynamic shapes, whose while loop
    # inductor 2.14 cannot lower once a parameter's shape is dynamic too ("'int' object
    # has no attribute 'meta'", a SymInt among the loop's inputs; tanh1024 then tanh32).
    torch._dynamo.reset()
    cases = {}
    for impl in ("torchdeq", "core", "compiled"):
        build_options = options
        if impl == "compiled" and check_every is not None:
            build_options = dict(options, f_solver_kwargs={"check_every": check_every})
        model, x = build(problem, impl, build_options)
        if model is None:
            continue
        forward, loss = model, (lambda x, model=model: loss_of(model(x)))
        if impl == "compiled":
            forward = torch.compile(model, mode=mode, options=inductor_options)
            loss = (lambda x, forward=forward: loss_of(forward(x))) if model_only else (
                torch.compile(loss, mode=mode, options=inductor_options))

        def train_step(loss=loss, model=model, x=x):
            model.train()
            model.zero_grad(set_to_none=True)
            loss(x).backward()

        def infer(forward=forward, model=model, x=x):
            model.eval()
            with torch.no_grad():
                forward(x)

        def train_forward(forward=forward, model=model, x=x):
            model.train()
            forward(x)

        cases[impl] = (train_step, infer, train_forward)
    return cases


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved_ms(fns, repeats):
    """{name: median ms} of the callables `fns`, run in turn `repeats` times after two
    warm-up calls each (the compiled ones compile there)."""
    for fn in fns.values():
        fn(), fn()
    samples = {kind: [] for kind in fns}
    for _ in range(repeats):
        for kind, fn in fns.items():
            samples[kind] += timed(fn, 1)
    return {kind: 1e3 * statistics.median(s) for kind, s in samples.items()}


def inductor_options_of(args):
    """torch.compile's ``options`` from `--cpp-wrapper` and `--inductor-option K=V` (V: an
    int or a Python literal, e.g. ``cpp.use_decompose_tanh=True``); None when none."""
    import ast

    options = {"cpp_wrapper": True} if args.cpp_wrapper else {}
    for item in args.inductor_option:
        key, _, value = item.partition("=")
        options[key] = ast.literal_eval(value)
    return options or None


def deq_options(args):
    """`get_deq` options from the command line, the same for every implementation."""
    options = dict(f_solver=args.solver, f_max_iter=args.f_max_iter, f_tol=args.tol)
    return dict(options, ift=True) if args.ift else options


def run(args):
    rows = []
    options, inductor_options = deq_options(args), inductor_options_of(args)
    for problem in args.problems:
        cases = make_cases(problem, options, args.mode, args.check_every, inductor_options,
                           args.model_only)
        for kind, index in (("train step", 0), ("inference", 1)):
            start = time.perf_counter()
            for impl, fns in cases.items():  # warm-up; the compiled one compiles here
                t0 = time.perf_counter()
                for _ in range(2):
                    fns[index]()
                if impl == "compiled":
                    compile_s = time.perf_counter() - t0
            samples = {impl: [] for impl in cases}
            for _ in range(args.repeats):  # interleaved
                for impl, fns in cases.items():
                    skip = impl == "compiled" and args.skip_guards  # after the warm-up compiled both modes
                    with (torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip
                          else contextlib.nullcontext()):
                        samples[impl] += timed(fns[index], 1)
            ms = {impl: 1e3 * statistics.median(s) for impl, s in samples.items()}
            row = {"problem": problem, "kind": kind, "ms": ms, "compile_s": compile_s,
                   "core_over_compiled": ms["core"] / ms["compiled"],
                   "torchdeq_over_compiled": (ms["torchdeq"] / ms["compiled"]
                                              if "torchdeq" in ms else None),
                   "setup_s": time.perf_counter() - start}
            rows.append(row)
            tdeq = f"{ms['torchdeq']:.2f}" if "torchdeq" in ms else "n/a"
            tratio = (f"{row['torchdeq_over_compiled']:.2f}x"
                      if row["torchdeq_over_compiled"] is not None else "n/a")
            print(f"| {problem} | {kind} | {tdeq} | {ms['core']:.2f} | {ms['compiled']:.2f} | "
                  f"{row['core_over_compiled']:.2f}x | {tratio} | {compile_s:.0f} |", flush=True)
    return rows


def breakdown(args):
    """Where core's training step goes, eager and compiled: the train-mode forward (grad
    on, no backward), the whole step, and the inference solve, interleaved, the median of
    `--repeats` each. step - forward is the loss and the backward after the model."""
    options = deq_options(args)
    print("| problem | core | train-mode forward ms | training step ms | step - forward ms "
          "| inference ms |\n|---|---|---:|---:|---:|---:|")
    for problem in args.problems:
        cases = make_cases(problem, options, args.mode, args.check_every, inductor_options_of(args),
                           args.model_only)
        fns = {impl: dict(zip(("step", "inference", "forward"), cases[impl]))
               for impl in ("core", "compiled")}
        for impl in fns:
            for fn in fns[impl].values():  # warm-up; the compiled ones compile here
                fn(), fn()
        samples = {(impl, kind): [] for impl in fns for kind in fns[impl]}
        for _ in range(args.repeats):
            for (impl, kind) in samples:
                samples[impl, kind] += timed(fns[impl][kind], 1)
        for impl in fns:
            ms = {kind: 1e3 * statistics.median(samples[impl, kind]) for kind in fns[impl]}
            print(f"| {problem} | {'eager' if impl == 'core' else 'compiled'} | {ms['forward']:.2f} "
                  f"| {ms['step']:.2f} | {ms['step'] - ms['forward']:.2f} | {ms['inference']:.2f} |",
                  flush=True)


def floor(args):
    """How close the inference solve comes to the cost of its cell alone: core eager and
    compiled solves against `nfe` calls of the race cell with nothing else (eager: a
    Python loop; compiled: the same loop traced into one graph, `nfe` addmm + tanh
    kernels), interleaved, the median of `--repeats` each. solve - cell is the solver's
    own cost (residuals, masks, best state, the loop); eager solve / compiled cell bounds
    the ratio core eager / compiled that any compiled solver could reach on this cell."""
    options, inductor_options = deq_options(args), inductor_options_of(args)
    print("| problem | nfe | core eager solve ms | cell alone x nfe, eager ms | core compiled "
          "solve ms | cell alone x nfe, compiled ms | eager / compiled solve | eager solve / "
          "compiled cell |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for problem in args.problems:
        if problem == "mdeq":
            continue  # no separate cell
        cases = make_cases(problem, options, args.mode, args.check_every, inductor_options)
        model, x = build(problem, "core", options)
        model.eval()
        with torch.no_grad():
            _, info = model.deq(lambda z: model.cell(z, x), torch.zeros_like(x))
        nfe = int(info["nfe"])

        def cells(x, cell=model.cell, nfe=nfe):
            z = torch.zeros_like(x)
            for _ in range(nfe):
                z = cell(z, x)
            return z

        compiled_cells = torch.compile(cells, mode=args.mode, options=inductor_options)

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn(x)
            return run

        fns = {"eager solve": cases["core"][1], "eager cell": no_grad(cells),
               "compiled solve": cases["compiled"][1], "compiled cell": no_grad(compiled_cells)}
        ms = interleaved_ms(fns, args.repeats)
        print(f"| {problem} | {nfe} | {ms['eager solve']:.2f} | {ms['eager cell']:.2f} | "
              f"{ms['compiled solve']:.2f} | {ms['compiled cell']:.2f} | "
              f"{ms['eager solve'] / ms['compiled solve']:.2f}x | "
              f"{ms['eager solve'] / ms['compiled cell']:.2f}x |", flush=True)


LADDER = ("cell", "stop mask", "best state", "trace", "safety net")


def ladder_solve(cell, x, max_iter, tol, rungs):
    """Fixed-point iteration of `cell` in one `torch.while_loop`, with the first `rungs`
    of core's per-step duties (`LADDER`), written by hand: "cell" only iterates (stopping
    at the step count core's solve took, `max_iter` here); "stop mask" adds the residual
    norms and per-sample freezing, the loop ending when no sample is active; "best
    state" the lowest residual and the state it came with; "trace" a residual trace row
    written in place; "safety net" the divergence limit, the caught samples and the step
    of the lowest residual (what core's tracker does). The solve under `no_grad`."""
    from torch._higher_order_ops.while_loop import while_loop

    batch = x.shape[0]
    z0 = torch.zeros_like(x)
    one = torch.ones((), dtype=torch.long)
    if rungs == 1:
        return while_loop(lambda k, z: k < max_iter, lambda k, z: (k + 1, cell(z, x)),
                          (one, cell(z0, x)))[1]
    trace = torch.full((max_iter + 1, 2, batch), 1e8)
    fz = cell(z0, x)
    res = torch.linalg.vector_norm(fz - z0, dim=1)
    limit = 1e3 * res

    # carried: k, z, active, then best and lowest (rung 3), lowest_step and caught (rung 5)
    names = ("best", "lowest", "lowest_step", "caught")[:0 if rungs < 3 else 2 if rungs < 5 else 4]

    def step(k, z, active, *rest):
        c = dict(zip(names, rest))
        k = k + 1
        fz = cell(z, x)
        res = torch.linalg.vector_norm(fz - z, dim=1)
        ok = active & (res <= limit) if rungs >= 5 else active
        if rungs >= 3:
            lowest = c["lowest"]
            improved = ok & (res < lowest)
            c["best"] = torch.where(improved.unsqueeze(1), fz, c["best"])
            c["lowest"] = torch.where(improved, res, lowest)
            if rungs >= 4:
                rel = res / (torch.linalg.vector_norm(fz, dim=1) + 1e-9)
                row = torch.where(active, torch.stack((res, rel)), lowest.expand(2, -1))
                trace.index_copy_(0, k.reshape(1), row.unsqueeze(0))
            if rungs >= 5:
                c["lowest_step"] = torch.where(improved, k.float(), c["lowest_step"])
                c["caught"] = c["caught"] | (active & ~ok)
        z = torch.where(active.unsqueeze(1), fz, z)
        return (k, z, ok & (res >= tol), *(c[name] for name in names))

    first = {"best": fz.clone(), "lowest": res, "lowest_step": torch.ones(batch),
             "caught": torch.zeros(batch, dtype=torch.bool)}
    carried = (one, fz, res >= tol, *(first[name] for name in names))
    out = while_loop(lambda k, z, active, *rest: (k < max_iter) & active.any(), step, carried)
    return out[3] if rungs >= 3 else out[1]


def ladder(args):
    """The compiled inference solve's cost, duty by duty: `ladder_solve` with 1..5 rungs
    against core's compiled and eager solves (fixed-point iteration, race problems of
    the tanh cell), interleaved, the median of `--repeats` each. The rungs' steps tell what
    each of core's per-step duties costs under inductor."""
    options, inductor_options = deq_options(args), inductor_options_of(args)
    print("| problem | solve | nfe | ms | core eager / this |\n|---|---|---:|---:|---:|")
    for problem in args.problems:
        if problem not in ("tanh32", "tanh1024"):
            continue
        cases = make_cases(problem, dict(options, f_solver="fixed_point_iter"), args.mode,
                           args.check_every, inductor_options)
        model, x = build(problem, "core", options)
        model.eval()
        with torch.no_grad():
            _, info = model.deq(lambda z: model.cell(z, x), torch.zeros_like(x))
        nfe = int(info["nfe"])
        fns = {"core eager": cases["core"][1], "core compiled": cases["compiled"][1]}
        for rungs, name in enumerate(LADDER, start=1):
            solve = torch.compile(lambda x, rungs=rungs: ladder_solve(
                model.cell, x, nfe if rungs == 1 else args.f_max_iter, args.tol, rungs),
                mode=args.mode, options=inductor_options)

            def run(solve=solve):
                with torch.no_grad():
                    solve(x)
            fns[f"+ {name}" if rungs > 1 else name] = run
        with torch.no_grad():  # the full ladder is core's solve: the same fixed point
            gap = (solve(x) - model(x)).abs().max().item()
        print(f"| {problem} | all rungs against core: max abs difference of z {gap:.1e} | | | |")
        ms = interleaved_ms(fns, args.repeats)
        for kind in fns:
            print(f"| {problem} | {kind} | {nfe} | {ms[kind]:.2f} | "
                  f"{ms['core eager'] / ms[kind]:.2f}x |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["tanh1024", "conv", "tanh32", "mdeq"],
                        choices=["tanh1024", "conv", "tanh32", "mdeq"])
    parser.add_argument("--solver", default="fixed_point_iter")
    parser.add_argument("--f-max-iter", type=int, default=40, help="DEQ default: 40")
    parser.add_argument("--tol", type=float, default=1e-4, help="abs tolerance (the race's)")
    parser.add_argument("--ift", action="store_true", help="IFT backward instead of phantom")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: inductor default)")
    parser.add_argument("--check-every", type=int, default=None,
                        help="compiled solve: steps per while-loop iteration (default: core's)")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="compile with options={'cpp_wrapper': True}: inductor's C++ wrapper "
                             "drives the while loop (a user-side setting)")
    parser.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an inductor option for torch.compile (repeatable), e.g. "
                             "cpp.use_decompose_tanh=True (a user-side setting)")
    parser.add_argument("--skip-guards", action="store_true",
                        help="time the compiled calls under torch.compiler.set_stance("
                             "skip_guard_eval_unsafe=True) (a user-side setting)")
    parser.add_argument("--model-only", action="store_true",
                        help="compiled training step: compile the model alone (the loss runs "
                             "eagerly around it) instead of the model and the loss")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead: core eager and compiled, train-mode forward / training "
                             "step / inference (where the step's time goes)")
    parser.add_argument("--floor", action="store_true",
                        help="instead: the inference solve against its cell alone, nfe "
                             "times (eager and compiled; race problems only)")
    parser.add_argument("--ladder", action="store_true",
                        help="instead: the compiled inference solve against hand-written "
                             "while loops with 1..5 of core's per-step duties (tanh problems)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        breakdown(args)
        return
    if args.floor:
        floor(args)
        return
    if args.ladder:
        ladder(args)
        return
    inductor_options = inductor_options_of(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, solver {args.solver}, "
          f"f_max_iter {args.f_max_iter}, tol {args.tol} abs, "
          f"{'IFT' if args.ift else '1-step phantom gradient'}, median of {args.repeats}"
          f"{', inductor options ' + str(inductor_options) if inductor_options else ''}"
          f"{', guards skipped' if args.skip_guards else ''}\n")
    print("| problem | case | TorchDEQ eager ms | core eager ms | core compiled ms | "
          "core eager / compiled | TorchDEQ / compiled | compile s |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = run(args)
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
