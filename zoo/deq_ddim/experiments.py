"""The two studies of DEQ-DDIM: sampling (DEQ vs sequential DDIM) and inversion.

`sampling_study(cfg, run, denoiser)` and `inversion_study(cfg, run, denoiser)` each
return ``(metrics, extra)`` for `Run.write_results` and draw their PNG into the run
directory (``trajectory.png``, ``inversion.png``). Metric keys are
``T<T>/<what>`` so one results.json holds every T, the DEQ and its sequential baseline.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.deq_ddim.data import build_datasets, inversion_targets
from zoo.deq_ddim.diffusion import DTYPES, Schedule, ddim_encode, ddim_sample
from zoo.deq_ddim.inversion import Inversion, deq_forward, gradient_cosine, run_side_by_side, sequential_forward
from zoo.deq_ddim.sampler import DEQSampler, Recorder


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def deq_options(cfg: DictConfig, **changes) -> dict:
    """``cfg.deq`` as a plain dict with `changes` applied (solver, budget, tolerance)."""
    options = OmegaConf.to_container(cfg.deq, resolve=True)
    options.update(changes)
    if options["f_solver"] != "anderson":
        options["f_solver_kwargs"] = {k: v for k, v in options.get("f_solver_kwargs", {}).items()
                                      if k not in ("m", "lam")}
    return options


def _seeded_noise(shape, dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(device)


# ----------------------------------------------------------------------------- sampling
def compare_sampling(denoiser, schedule, x_T: torch.Tensor, options: dict, chunk: int, mix: str,
                     target: float) -> dict:
    """One DEQ solve against the sequential sampler: the max |x_0 difference| after every
    solver iteration, the first iteration within `target`, evaluations and times."""
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = ddim_sample(denoiser, schedule, x_T, keep_trajectory=True)
    seq_time = time.perf_counter() - t0
    sampler = DEQSampler(denoiser, schedule, options, chunk=chunk, mix=mix).eval()
    rec = Recorder()
    with torch.no_grad():
        traj, info = sampler.sample(x_T, recorder=rec)
    diffs = [float((f - seq[:, -1]).abs().max()) for f in rec.finals]
    reached = next((i + 1 for i, d in enumerate(diffs) if d <= target), None)
    k = schedule.num_latents
    return {
        "diffs": diffs, "times": rec.times, "iters_to_target": reached,
        "time_to_target_s": rec.times[reached - 1] if reached else None,
        "evals_to_target": reached * k if reached else None,   # denoiser latents per image
        "sequential_evals": k, "sequential_time_s": seq_time,
        "final_diff": diffs[-1], "best_diff": min(diffs), "solver_calls": len(diffs),
        "final_traj_diff": float((traj - seq).abs().max()),
        "sequential": seq[0], "snapshots": rec.snapshots,
    }


def sampling_study(cfg: DictConfig, run, denoiser) -> tuple[dict, dict]:
    """digits_sampling: every (T, dtype, solver) of ``sampling_study``; trajectory.png."""
    study = cfg.sampling_study
    b, res, ch = int(cfg.sampling.batch), denoiser.size.resolution, denoiser.size.in_channels
    metrics, rows, curves, panel = {}, [], {}, None
    panel_T = 50 if 50 in study.timesteps else int(study.timesteps[0])
    for T in study.timesteps:
        schedule = Schedule.from_config(cfg, int(T))
        budget = int(study.max_iter or schedule.num_latents)
        for dtype_name in study.dtypes:
            dtype = DTYPES[str(dtype_name)]
            model = copy.deepcopy(denoiser).to(dtype)
            x_T = _seeded_noise((b, ch, res, res), dtype, run.device, seed=int(cfg.seed))
            for solver in study.solvers:
                options = deq_options(cfg, f_solver=str(solver), f_max_iter=budget, eval_f_max_iter=budget,
                                      f_tol=1e-12, f_stop_mode="abs")
                r = compare_sampling(model, schedule, x_T, options, int(cfg.sampling.chunk), str(cfg.sampling.mix),
                                     float(study.target))
                key = f"T{T}/{dtype_name}/{solver}"
                metrics.update({f"{key}/iters_to_target": r["iters_to_target"] or -1,
                                f"{key}/best_diff": r["best_diff"],
                                f"{key}/time_to_target_s": r["time_to_target_s"] or -1.0})
                metrics[f"T{T}/{dtype_name}/sequential_time_s"] = r["sequential_time_s"]
                rows.append({"T": int(T), "latents": schedule.num_latents, "dtype": str(dtype_name),
                             "solver": str(solver), **{k: r[k] for k in (
                                 "iters_to_target", "evals_to_target", "time_to_target_s", "best_diff",
                                 "final_diff", "final_traj_diff", "solver_calls", "sequential_evals",
                                 "sequential_time_s")}, "diffs": r["diffs"], "times": r["times"]})
                if dtype_name == "float32":
                    curves[(int(T), str(solver))] = r["diffs"]
                    if panel is None and str(solver) == "anderson" and int(T) == panel_T:
                        panel = (r["sequential"], r["snapshots"])
                if run.is_main:
                    print(f"[digits_sampling] T={T} {dtype_name} {solver}: max|diff| {r['best_diff']:.2e} best, "
                          f"{r['iters_to_target']} iterations to {study.target:g} "
                          f"({r['time_to_target_s'] or float('nan'):.2f} s; sequential {r['sequential_time_s']:.2f} s)",
                          flush=True)
    if run.is_main:
        draw_trajectory(run.out_dir / "trajectory.png", curves, panel, float(study.target))
    return metrics, {"sampling_rows": rows}


def draw_trajectory(path, curves: dict, panel, target: float) -> None:
    """Left: the sequential trajectory of one image and the DEQ's at a few iterations
    (T=50 or the first T, Anderson, float32); right: max |x_0 difference| against solver iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 5))
    left = fig.add_gridspec(1, 2, width_ratios=[1.3, 1])[0].subgridspec(1, 1)
    ax_r = fig.add_subplot(fig.add_gridspec(1, 2, width_ratios=[1.3, 1])[1])
    if panel is not None:
        seq, snaps = panel
        k = seq.shape[0]
        slots = sorted({int(round(i * (k - 1) / 7)) for i in range(8)})
        iters = [i for i in (1, 2, 3, 5, 10, 15, 25) if i <= len(snaps)]
        rows = [("sequential", seq)] + [(f"DEQ it {i}", snaps[i - 1]) for i in iters]
        grid = left[0].subgridspec(len(rows), len(slots), wspace=0.05, hspace=0.1)
        for r, (name, traj) in enumerate(rows):
            for c, s in enumerate(slots):
                ax = fig.add_subplot(grid[r, c])
                ax.imshow(traj[s, 0].float().cpu().clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=7)
                if r == 0:
                    ax.set_title(f"slot {s}", fontsize=7)
    for (T, solver), diffs in sorted(curves.items()):
        style = "-" if solver == "anderson" else "--"
        ax_r.semilogy(range(1, len(diffs) + 1), diffs, style, label=f"T={T} {solver}")
    ax_r.axhline(target, color="gray", lw=0.8)
    ax_r.set_xlabel("solver iterations")
    ax_r.set_ylabel("max |x_0(DEQ) - x_0(sequential)|")
    ax_r.set_title("float32, digits denoiser")
    if curves:
        ax_r.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- inversion
def inversion_study(cfg: DictConfig, run, denoiser) -> tuple[dict, dict]:
    """Inversion of ``data.num_targets`` images at each T of ``inversion.timesteps``, the DEQ
    against the sequential baseline, ``inversion.batch_size`` images at a time, the two
    stepped in turn, each with the time budget ``inversion.time_budget_s`` on its own
    clock (the time of its own steps); inversion.png."""
    inv = cfg.inversion
    splits = build_datasets(cfg.data)
    targets = inversion_targets(cfg.data, splits, int(cfg.seed)).to(run.device)
    budget = float(inv.time_budget_s) if inv.time_budget_s is not None else float("inf")
    metrics, extra, shown = {}, {"inversion": {}}, {}
    for T in inv.timesteps:
        schedule = Schedule.from_config(cfg, int(T))
        sampler = DEQSampler(denoiser, schedule, OmegaConf.to_container(cfg.deq, resolve=True),
                             chunk=int(cfg.sampling.chunk), mix=str(cfg.sampling.mix))
        per_method = {m: [] for m in inv.methods}
        cosines = []
        size = int(inv.batch_size)
        for first in range(0, len(targets), size):
            batch = targets[first:first + size]
            with torch.no_grad():
                x_T0 = ddim_encode(denoiser, schedule, batch)
            cosines += gradient_cosine(sampler, denoiser, schedule, x_T0, batch)
            inversions = {}
            for method in inv.methods:
                forward = deq_forward(sampler) if method == "deq" else sequential_forward(denoiser, schedule)
                inversions[method] = Inversion(forward, x_T0, batch, lr=float(inv.lr[method]),
                                               max_steps=int(inv.max_steps), threshold=float(inv.threshold),
                                               time_budget_s=budget, grad_clip=float(inv.grad_clip))
            run_side_by_side(list(inversions.values()))  # stepped in turn: the same load on both
            for method, inversion in inversions.items():
                per_method[method] += inversion.traces
                if run.is_main:
                    for i, trace in enumerate(inversion.traces):
                        s = trace.summary()
                        print(f"[inversion] T={T} image {first + i} {method}: loss {trace.losses[0]:.3g} -> "
                              f"{s['final_loss']:.3g} in {s['steps']} steps, {s['time_s']:.1f} s (threshold at "
                              f"{s['time_to_threshold_s'] if s['time_to_threshold_s'] is not None else '-'} s)",
                              flush=True)
        recon = {m: [t.best_x0.cpu() for t in traces] for m, traces in per_method.items()}
        key = f"T{T}"
        times = {m: _median([t.summary()["time_s"] for t in traces]) for m, traces in per_method.items()}
        seq_time = times.get("sequential")
        for method, traces in per_method.items():
            summ = [t.summary() for t in traces]
            reached = [s["time_to_threshold_s"] for s in summ if s["time_to_threshold_s"] is not None]
            metrics.update({
                f"{key}/{method}/final_loss": _median(s["final_loss"] for s in summ),
                f"{key}/{method}/reached_threshold": len(reached),
                f"{key}/{method}/time_to_threshold_s": _median(reached) if len(reached) * 2 > len(summ) else -1.0,
                f"{key}/{method}/time_s": times[method],
                f"{key}/{method}/step_s": _median(s["mean_step_s"] for s in summ),
                f"{key}/{method}/steps": _median(s["steps"] for s in summ),
            })
            if seq_time:
                metrics[f"{key}/{method}/rel_time"] = times[method] / seq_time
            if method == "deq":
                metrics[f"{key}/deq/solver_iters"] = _median(s["mean_solver_iters"] for s in summ)
            extra["inversion"][f"{key}/{method}"] = [
                {**s, "losses": t.losses, "times": t.times} for s, t in zip(summ, traces)]
        metrics[f"{key}/grad_cosine_pg_vs_exact"] = _median(cosines)
        extra["inversion"][f"{key}/grad_cosines"] = cosines
        extra["inversion"][f"{key}/latents"] = schedule.num_latents
        shown[int(T)] = (targets.cpu(), recon, per_method)
    if run.is_main:
        draw_inversion(run.out_dir / "inversion.png", shown, float(inv.threshold))
    return metrics, extra


def draw_inversion(path, shown: dict, threshold: float) -> None:
    """Per T: targets, DEQ and sequential reconstructions, and loss against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"deq": "tab:blue", "sequential": "tab:red"}
    fig = plt.figure(figsize=(14, 3.6 * len(shown)))
    outer = fig.add_gridspec(len(shown), 2, width_ratios=[1.4, 1])
    for r, (T, (targets, recon, per_method)) in enumerate(sorted(shown.items())):
        n = len(targets)
        rows = [("target", list(targets))] + [(m, recon[m]) for m in recon]
        grid = outer[r, 0].subgridspec(len(rows), n, wspace=0.05, hspace=0.1)
        for i, (name, images) in enumerate(rows):
            for j in range(n):
                ax = fig.add_subplot(grid[i, j])
                img = images[j]
                ax.imshow((img.permute(1, 2, 0).squeeze(-1) if img.shape[0] in (1, 3) else img).float()
                          .clamp(-1, 1).add(1).div(2).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{name}" if i else f"T={T}\n{name}", fontsize=8)
        ax = fig.add_subplot(outer[r, 1])
        for method, traces in per_method.items():
            for k, t in enumerate(traces):
                ax.semilogy(t.times, t.losses, color=colors.get(method, "k"), alpha=0.5, lw=1,
                            label=method if k == 0 else None)
        ax.axhline(threshold, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("per-image sum of squared errors")
        ax.set_title(f"T={T}: loss against time (one line per image)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
