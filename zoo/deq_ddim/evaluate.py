"""Evaluate a denoiser as a DEQ sampler: ``python -m zoo.deq_ddim.evaluate +experiment=<name> ckpt=<path>``.

``ckpt`` is a zoo checkpoint of the denoiser (a digits_ddpm run directory or its
``denoiser.ckpt`` file) or, with ``denoiser.format=ddpm``, a published DDPM state dict
(zoo.deq_ddim.convert). It samples ``sampling.batch`` images from fixed noise (``seed``)
with sequential DDIM and with the DEQ at the test-time budget ``deq.eval_f_max_iter``
(0: ``deq.f_max_iter``) and ``sampling.timesteps`` T, and reports the largest absolute
difference of the final images, the solver's residuals and the wall times. With
``eval.sweep=true`` it repeats the DEQ solve for each budget in ``eval.sweep_iterations``
(``nfe_sweep.json`` / ``nfe_sweep.png`` in the run dir).
"""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.common import evaluate_checkpoint, zoo_main
from zoo.common.sweep import report_sweep, residual_summary, sweep_rows
from zoo.deq_ddim.convert import load_ddpm_checkpoint
from zoo.deq_ddim.diffusion import DTYPES, Schedule, ddim_sample
from zoo.deq_ddim.sampler import DEQSampler
from zoo.deq_ddim.train import build_model, set_threads

# Options evaluate.py may change on a checkpoint's config (besides zoo.common's: the
# solver budget deq.eval_f_max_iter, the forward solver, eval.*): the sampler's.
TEST_TIME_KEYS = ("sampling.*", "seed")


def evaluate_sampler(model: torch.nn.Module, run) -> dict:
    """DEQ vs sequential sampling with the options of ``run.cfg`` (see the module doc)."""
    cfg = run.cfg
    set_threads(cfg, run)
    dtype = DTYPES[str(cfg.sampling.dtype)]
    model = model.to(dtype).eval()
    schedule = Schedule.from_config(cfg)
    size = model.size
    gen = torch.Generator().manual_seed(int(cfg.seed))
    x_T = torch.randn(int(cfg.sampling.batch), size.in_channels, size.resolution, size.resolution,
                      generator=gen, dtype=torch.float64).to(dtype).to(run.device)
    t0 = time.perf_counter()
    x0_seq = ddim_sample(model, schedule, x_T)
    seq_time = time.perf_counter() - t0
    sampler = DEQSampler(model, schedule, OmegaConf.to_container(cfg.deq, resolve=True),
                         chunk=int(cfg.sampling.chunk), mix=str(cfg.sampling.mix)).eval()

    def solve(solver_kwargs=None):
        t0 = time.perf_counter()
        traj, info = sampler.sample(x_T, solver_kwargs=solver_kwargs)
        return float((traj[:, -1] - x0_seq).abs().max()), info, time.perf_counter() - t0

    diff, info, deq_time = solve()
    out = {"eval/max_abs_diff": diff, "eval/deq_time_s": deq_time, "eval/sequential_time_s": seq_time,
           "eval/latents": schedule.num_latents, "deq_info": info}
    if cfg.eval.get("sweep"):
        def at_budget(budget: int) -> dict[str, float]:
            d, info_k, _ = solve({"f_max_iter": budget})
            return {"max_abs_diff": d, **residual_summary(info_k)}

        rows = sweep_rows(cfg.eval.sweep_iterations, at_budget)
        report_sweep(rows, run, metric="max_abs_diff", metric_label="max |x_0(DEQ) - x_0(DDIM)|",
                     title=f"DEQ-DDIM T={schedule.num_latents}")
        out["nfe_sweep"] = rows
    return out


def load_weights(model: torch.nn.Module, run) -> None:
    """``denoiser.format=ddpm``: the published DDPM checkpoint ``ckpt`` (zoo.deq_ddim.convert)."""
    if not run.cfg.get("ckpt"):
        raise ValueError("ckpt is not set: pass ckpt=<DDPM checkpoint file>")
    load_ddpm_checkpoint(model, str(run.cfg.ckpt), ema=bool(run.cfg.denoiser.ema))


def evaluate(cfg: DictConfig) -> dict:
    """Metrics of ``cfg.ckpt`` as a DEQ sampler (results.json with ``status: evaluated``)."""
    fmt = str(cfg.denoiser.format)
    if fmt not in ("ours", "ddpm"):
        raise ValueError(f"denoiser.format={fmt!r}: use ours or ddpm")
    return evaluate_checkpoint(cfg, "deq_ddim", build_model, evaluate_sampler,
                               load_weights=load_weights if fmt == "ddpm" else None,
                               test_time_keys=TEST_TIME_KEYS)


@zoo_main("deq_ddim")
def main(cfg: DictConfig) -> None:
    print({k: v for k, v in evaluate(cfg).items() if not isinstance(v, (list, dict))})


if __name__ == "__main__":
    main()
