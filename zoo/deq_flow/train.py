"""Train DEQ-Flow (or the RAFT baseline): ``python -m zoo.deq_flow.train +experiment=<name>``.

Experiments (configs/deq_flow/experiment/): ``chairs`` / ``chairs_h`` and ``things`` /
``things_h`` (the TorchDEQ recipes of Table 4; the Things stage starts from a Chairs
checkpoint with ``init_from=<run dir>``), ``synthetic`` (offline: the ``cpu`` size on
FlyingChairs-like pairs made from scikit-image pictures) and ``synthetic_raft``
(torchvision's ``raft_small``, no weights, trained the same way for the same time).

The loss is the fixed-point correction of DEQ-Flow: the masked L1 of every flow the DEQ
returns (``deq.n_states``; RAFT: every update), weighted ``deq.gamma``^(n-k-1). With
``train.time_budget_min`` the training takes that long on ``train.budget_clock``
(``wall``, or ``cpu``: this process's CPU time, which on a shared machine stands for the
wall time of the same single-threaded run alone): the schedule follows the share of the
budget spent and the run ends when it is spent; the offline runs give DEQ-Flow and RAFT
the same budget. At the end the run evaluates ``eval.sets`` (AEPE, n-px accuracy; KITTI
AEPE and F1-all), zero flow on the same sets, the test-time iteration sweep
(``eval.sweep``), the warm-start check on synthetic 3-frame sequences
(``eval.warm_start_check``) and draws ``flow_examples.png``.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from zoo.common import ClockedSchedule, Run, build_optimizer, build_scheduler, zoo_main
from zoo.common.sweep import report_sweep, residual_summary, sweep_rows
from zoo.deq_flow.data import EvalSet, FlowData, build_datasets, collate_pairs
from zoo.deq_flow.metrics import FlowMeter, flow_loss
from zoo.deq_flow.model import DEQFlow, InputPadder, RAFTBaseline, get_size

SIZE_FIELDS = ("hidden_dim", "context_dim", "feature_dim", "corr_dims", "flow_dims", "cat_dim", "head_dim",
               "encoder_dims", "mask_dim")


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """DEQ-Flow of ``cfg.model.size`` (``model.arch=deq_flow``) or the RAFT baseline."""
    m = cfg.model
    if str(m.arch) == "raft_small":
        return RAFTBaseline(iters=int(m.raft_iters), eval_iters=int(m.raft_eval_iters))
    if str(m.arch) != "deq_flow":
        raise ValueError(f"model.arch={m.arch!r}: deq_flow or raft_small")
    size = get_size(str(m.size), **{k: m.get(k) for k in SIZE_FIELDS})
    return DEQFlow(size, deq=cfg.deq, all_grad=bool(m.all_grad), dropout=float(m.dropout),
                   freeze_bn=bool(m.freeze_bn), context_norm=str(m.get("context_norm", "batch")))


def optimizer_options(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if v is not None}


def _merge_infos(infos: list) -> Optional[dict]:
    infos = [i for i in infos if i]
    if not infos:
        return None
    out = {}
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        if all(key in i for i in infos):
            out[key] = torch.cat([torch.as_tensor(i[key]).detach().flatten().float().cpu() for i in infos])
    nfe = [float(torch.as_tensor(i["nfe"]).float().mean()) for i in infos if "nfe" in i]
    if nfe:
        out["nfe"] = sum(nfe) / len(nfe)
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, img1: torch.Tensor, img2: torch.Tensor, pad_mode: str = "sintel",
            budget: Optional[int] = None, init: Any = None, solver_kwargs: Optional[dict] = None):
    """Padded prediction cropped back: (flow (N, 2, H, W), info, state).

    ``budget`` overrides the solver budget (``f_max_iter``), ``solver_kwargs`` the rest."""
    padder = InputPadder(img1.shape, pad_mode)
    a, b = padder.pad_(img1, img2)
    kwargs = dict(solver_kwargs or {})
    if budget is not None:
        kwargs["f_max_iter"] = int(budget)
    flows, info, state = model(a, b, init=init, solver_kwargs=kwargs or None)
    return padder.unpad(flows[-1]), info, state


@torch.no_grad()
def evaluate_set(model: torch.nn.Module, ev: EvalSet, device: torch.device, batch_size: int = 1,
                 budget: Optional[int] = None, warm_start: bool = False):
    """Metrics of ``ev`` under its protocol and the merged solver info.

    ``warm_start``: along a set with ``scenes`` (Sintel), each pair starts from the previous
    pair's fixed point when both belong to the same scene (batch size 1).
    """
    scenes = ev.scenes if warm_start else None
    loader = DataLoader(ev.dataset, batch_size=1 if scenes is not None else batch_size, shuffle=False,
                        collate_fn=collate_pairs)
    meter, infos, state, last_scene = FlowMeter(ev.protocol), [], None, None
    for i, (img1, img2, flow, valid) in enumerate(loader):
        init = state if scenes is not None and scenes[i] == last_scene else None
        pred, info, state = predict(model, img1.to(device), img2.to(device), ev.pad_mode, budget, init)
        meter.update(pred.cpu(), flow, valid if ev.use_valid else None)
        infos.append(info)
        last_scene = scenes[i] if scenes is not None else None
    return meter.result(ev.name), _merge_infos(infos)


def zero_flow_metrics(ev: EvalSet) -> dict[str, float]:
    """The metrics of predicting zero flow everywhere (the offline baseline)."""
    meter = FlowMeter(ev.protocol)
    for img1, img2, flow, valid in DataLoader(ev.dataset, batch_size=16, collate_fn=collate_pairs):
        meter.update(torch.zeros_like(flow), flow, valid if ev.use_valid else None)
    return meter.result(ev.name)


@torch.no_grad()
def warm_start_check(model: torch.nn.Module, sequences, device: torch.device, batch_size: int,
                     budget: int = 36, tol: float = 1e-2) -> dict[str, float]:
    """On 3-frame sequences: AEPE and solver steps of pair 2->3, cold vs warm from pair 1->2.

    Each solve stops at the relative residual `tol` (or after `budget` steps)."""
    cold, warm, steps = FlowMeter(), FlowMeter(), {"cold": [], "warm": []}
    stop = {"f_tol": float(tol), "f_stop_mode": "rel"}
    for frames, flows, valids in DataLoader(sequences, batch_size=batch_size, shuffle=False):
        frames = frames.to(device)
        _, _, state = predict(model, frames[:, 0], frames[:, 1], budget=budget, solver_kwargs=stop)
        for name, init, meter in (("cold", None, cold), ("warm", state, warm)):
            pred, info, _ = predict(model, frames[:, 1], frames[:, 2], budget=budget, init=init,
                                    solver_kwargs=stop)
            meter.update(pred.cpu(), flows[:, 1], valids[:, 1])
            steps[name].append(torch.as_tensor(info["nstep"]).float().flatten().cpu())
    out = {}
    for name, meter in (("cold", cold), ("warm", warm)):
        out[f"warm_start/{name}_aepe"] = meter.result("x")["x/aepe"]
        out[f"warm_start/{name}_nstep"] = float(torch.cat(steps[name]).mean())
    return out


def iteration_sweep(model: torch.nn.Module, ev: EvalSet, device: torch.device, budgets, batch_size: int):
    """AEPE and residuals on ``ev`` for each test-time budget (RAFT: number of updates)."""
    def one(k: int) -> dict:
        metrics, info = evaluate_set(model, ev, device, batch_size, budget=k)
        return {"aepe": metrics[f"{ev.name}/aepe"], **residual_summary(info or {})}

    return sweep_rows(budgets, one)


def evaluate_all(model: torch.nn.Module, data: FlowData, cfg: DictConfig, device: torch.device,
                 budget: Optional[int] = None) -> dict[str, Any]:
    """Metrics of every evaluation set, with the merged DEQ info (``deq_info``)."""
    metrics, infos = {}, []
    for ev in data.evals:
        m, info = evaluate_set(model, ev, device, int(cfg.train.eval_batch_size), budget,
                               warm_start=bool(cfg.eval.warm_start))
        metrics.update(m)
        infos.append(info)
    return {**metrics, "deq_info": _merge_infos(infos)}


def final_reports(model: torch.nn.Module, data: FlowData, cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Baselines, sweep, warm start and pictures after training (or in evaluate.py)."""
    extra: dict[str, Any] = {"zero_flow": {}}
    for ev in data.evals:
        extra["zero_flow"].update(zero_flow_metrics(ev))
    model.eval()
    is_deq = isinstance(Run.unwrap(model), DEQFlow)
    if cfg.eval.get("sweep") and data.evals:
        rows = iteration_sweep(model, data.evals[0], run.device, list(cfg.eval.sweep_iterations),
                               int(cfg.train.eval_batch_size))
        extra["nfe_sweep"] = rows
        label = "solver iterations" if is_deq else "RAFT updates"
        report_sweep(rows, run, metric="aepe", metric_label=f"{data.evals[0].name} AEPE (px)",
                     title=f"{'DEQ-Flow' if is_deq else 'RAFT'} {run.experiment} ({label})")
    if cfg.eval.get("warm_start_check") and data.sequences is not None and is_deq:
        extra["warm_start"] = warm_start_check(model, data.sequences, run.device, int(cfg.train.eval_batch_size),
                                               int(cfg.eval.warm_start_budget), float(cfg.eval.warm_start_tol))
    if int(cfg.eval.get("examples", 0)) > 0 and run.is_main and data.evals:
        from zoo.deq_flow.plots import flow_examples

        flow_examples(model, data.evals, run.out_dir / "flow_examples.png", int(cfg.eval.examples), run.device)
    return extra


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
BUDGET_STEP_CAP = 1.5  # a time-budgeted run stops at this many times the calibrated steps at most


def calibrate_steps(train_step, batches, budget_s: float, clock: str = "wall", probe: int = 3) -> tuple[int, float]:
    """Steps that fit in ``budget_s``: times ``probe`` steps (batch + forward + backward, no update).

    The estimate sizes the schedule's resolution and the step cap; the run itself ends when
    the clock says so (`ClockedSchedule`), as the probe is off by a few per cent.

    ``clock="cpu"`` measures this process's CPU time: on a shared machine it stands for the
    wall time the same single-threaded run takes alone (run with ``train.cpu_threads=1``).
    """
    if clock not in CLOCKS:
        raise ValueError(f"train.budget_clock={clock!r}: wall or cpu")
    now = CLOCKS[clock]
    it = iter(batches(0, 0))
    times = []
    for _ in range(probe + 1):
        t0 = now()
        train_step(next(it), 0, update=False)
        times.append(now() - t0)
    step_s = sum(times[1:]) / probe  # the first call pays one-off costs
    return max(int(budget_s / step_s), 1), step_s


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training; returns the final metrics."""
    with Run(cfg, project="deq_flow") as run:
        data = build_datasets(cfg.data, list(cfg.eval.sets))  # a missing dataset stops here
        model = run.wrap(build_model(cfg))
        optimizer = build_optimizer(model, optimizer_options(cfg))
        batches = run.loader(data.train, batch_size=int(cfg.train.batch_size), shuffle=True,
                             num_workers=int(cfg.data.num_workers), collate_fn=collate_pairs,
                             drop_last=True)
        gamma, max_flow = float(cfg.deq.gamma), float(cfg.train.max_flow)
        state = {"scheduler": None}

        def train_step(batch, step, update: bool = True):
            img1, img2, flow, valid = (t.to(run.device, non_blocking=True) for t in batch)
            with run.autocast():
                flows, info, _ = model(img1, img2)
                loss = flow_loss(flows, flow, valid, gamma, max_flow)
            if not update:
                loss.backward()
                optimizer.zero_grad(set_to_none=True)
                return {}
            run.backward_step(loss, optimizer, model.parameters(), cfg.clip, state["scheduler"])
            with torch.no_grad():
                epe = ((flows[-1] - flow).norm(dim=1) * valid).sum() / valid.sum().clamp_min(1)
            return {"train/loss": loss.detach(), "train/epe": epe, "deq_info": info}

        steps, step_s, until = int(cfg.train.steps), None, None
        if cfg.train.get("time_budget_min"):
            if run.dist.enabled:  # each rank's clock would set its own learning rate
                raise ValueError("train.time_budget_min is for one process; under torchrun set train.steps")
            clock = str(cfg.train.get("budget_clock", "wall"))
            budget_s = 60.0 * float(cfg.train.time_budget_min)
            expected, step_s = calibrate_steps(train_step, batches, budget_s, clock)
            steps = int(BUDGET_STEP_CAP * expected) + 1
            run.say(f"time budget {cfg.train.time_budget_min} min ({clock} clock) at {step_s:.2f} s/step: "
                    f"about {expected} steps (at most {steps}); the schedule follows the clock")
            scheduler = ClockedSchedule(build_scheduler(optimizer, cfg.sched, expected), expected, budget_s,
                                        CLOCKS[clock])
            until = scheduler.done
        else:
            scheduler = build_scheduler(optimizer, cfg.sched, steps)
        state["scheduler"] = scheduler

        def evaluate(step):
            return evaluate_all(model, data, cfg, run.device)

        out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                      batches=batches, total_steps=steps, evaluate=evaluate, eval_every=cfg.train.eval_every,
                      until=until)
        if out.status == "completed":
            extra = final_reports(model, data, cfg, run)
            extra.update({"params": sum(p.numel() for p in model.parameters()), "train_steps": out.step,
                          "calibrated_step_s": step_s, "process_cpu_s": time.process_time()})
            run.write_results(out.metrics, deq_stats=out.deq, extra=extra)
        return out.metrics


@zoo_main("deq_flow")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
