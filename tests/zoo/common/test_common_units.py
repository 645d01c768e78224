"""zoo.common pieces in-process: configs, schedules, checkpoints, sampler, diagnostics, tables."""
import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException

from zoo.common import (CheckpointManager, ClockedSchedule, MissingDataError, ResumableSampler, build_optimizer,
                        build_scheduler, clip_gradients, compose, deq_metrics, latest_valid,
                        load_checkpoint, require_files)
from zoo.common.checkpoint import rng_state, set_rng_state
from zoo.common.config_check import check_runtime_options
from zoo.common.convert import check_fits, load_strictly
from zoo.common.hydra_main import CONFIGS_DIR

TOY = Path(__file__).parent / "toy_project"
TOY_CONFIGS = TOY / "configs"
REPO = Path(__file__).resolve().parents[3]


def toy_cfg(*overrides, hydra=False):
    return compose("toy", list(overrides), config_dir=TOY_CONFIGS, return_hydra_config=hydra)


# ----------------------------------------------------------------------------- configs
def test_compose_uses_shared_deq_presets_and_overrides():
    cfg = toy_cfg("+experiment=tiny")
    assert cfg.deq.f_solver == "fixed_point_iter" and cfg.deq.f_max_iter == 12  # default preset + experiment
    assert cfg.seed == 0 and cfg.logger.wandb.mode == "disabled"               # run_defaults + project
    cfg = toy_cfg("+experiment=tiny", "deq=anderson_ift", "deq.f_max_iter=30")
    assert (cfg.deq.f_solver, cfg.deq.ift, cfg.deq.f_max_iter, cfg.deq.b_max_iter) == ("anderson", True, 30, 35)


def test_run_dir_pattern_names_project_experiment_and_time(monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", "/somewhere")
    cfg = toy_cfg("+experiment=wide", hydra=True)
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith("/somewhere/toy/wide/") and len(Path(run_dir).name) == len("2026-01-01_00-00-00_000000")


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as err:
        toy_cfg("+experiment=nope")
    message = str(err.value)
    assert "experiment/nope" in message and "tiny" in message and "wide" in message


@pytest.mark.parametrize("override, option", [
    ("seed=abc", "seed"), ("log.every=1.5", "log.every"), ("checkpoint.keep=many", "checkpoint.keep"),
    ("amp=fp8", "amp"), ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
    ("deq.f_max_iter=abc", "deq.f_max_iter"), ("deq.f_stop_mode=absolute", "deq.f_stop_mode"),
])
def test_wrongly_typed_override_names_the_option(override, option):
    cfg = toy_cfg("+experiment=tiny", override)
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        check_runtime_options(cfg)


def test_launcher_configs_compose():
    slurm = toy_cfg("+experiment=tiny", "hydra/launcher=slurm", hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout == 3 and slurm.signal_delay_s == 120
    local = toy_cfg("+experiment=tiny", "hydra/launcher=local", hydra=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher")
    assert (CONFIGS_DIR / "hydra" / "launcher" / "slurm.yaml").is_file()


def test_require_files_names_missing_files_and_layout(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    assert require_files(tmp_path, ["a.bin"], layout="L") == tmp_path
    with pytest.raises(MissingDataError, match=r"(?s)lacks 1 of 2.*b/c\.bin.*Expected layout: <root>/b/c\.bin"):
        require_files(tmp_path, ["a.bin", "b/c.bin"], layout="<root>/b/c.bin")
    with pytest.raises(MissingDataError, match=r"data\.root is not set"):
        require_files(None, ["a.bin"], layout="L")


# ----------------------------------------------------------------------------- optimisation
def _lrs(sched_cfg, total, lr=1.0):
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "sgd", "lr": lr, "momentum": 0.9})
    sched = build_scheduler(opt, sched_cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_schedule_values():
    lrs = _lrs({"name": "cosine", "warmup_steps": 2, "eta_min": 0.1}, total=10)
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    # after warm-up: eta_min + (1 - eta_min)(1 + cos(pi s / 8)) / 2 at s = step - 2
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_one_cycle_peaks_at_pct_start_and_anneals_linearly():
    lrs = _lrs({"name": "one_cycle", "pct_start": 0.24, "div_factor": 10, "final_div_factor": 100}, total=25)
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 5
    assert lrs[13] - lrs[12] == pytest.approx(lrs[14] - lrs[13])  # linear anneal
    assert lrs[-1] == pytest.approx(1.0 / 10 / 100)


def test_clocked_schedule_follows_the_share_of_the_budget_spent_and_resumes():
    sched_cfg = {"name": "one_cycle", "pct_start": 0.24, "div_factor": 10, "final_div_factor": 100}
    by_step = _lrs(sched_cfg, total=25)

    def clocked(now, resolution=25):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "sgd", "lr": 1.0})
        return opt, ClockedSchedule(build_scheduler(opt, sched_cfg, resolution), resolution, budget_s=50.0,
                                    clock=lambda: now[0])

    now = [100.0]
    opt, sched = clocked(now)
    lrs = []
    for t in (110.0, 120.0, 137.0, 149.9):  # 20, 40, 74 and 99.8% of the budget: steps 5, 10, 18, 24
        now[0] = t
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        assert not sched.done()
    assert lrs == pytest.approx([by_step[5], by_step[10], by_step[18], by_step[24]])
    now[0] = 150.0
    assert sched.done()
    # a resumed run: another clock (and another probe: 40 steps), the checkpoint's 20 s spent
    # and 25-step resolution come back
    now[0] = 120.0
    state = sched.state_dict()
    later = [7.0]
    opt2, resumed = clocked(later, resolution=40)
    resumed.load_state_dict(state)
    later[0] = 24.0
    opt2.step()
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(by_step[18]) and not resumed.done()
    later[0] = 37.0
    assert resumed.done()


def test_step_schedule_and_optimizer_errors():
    assert _lrs({"name": "step", "step_size": 3, "gamma": 0.5}, total=7) == pytest.approx([1, 1, 1, .5, .5, .5, .25])
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(p, {"name": "sgd", "lr": 0.1, "nesterov": True})
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(p, {"name": "lamb", "lr": 0.1})
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(p, {"name": "sgd", "lr": 0.1, "betas": [0.9, 0.99]})
    assert isinstance(build_optimizer(p, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}), torch.optim.AdamW)
    # an experiment switching optimiser nulls the options of the other one
    adam = build_optimizer(p, {"name": "adam", "lr": 1e-3, "momentum": None, "nesterov": None})
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3


def test_clip_by_norm_and_value():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], {"norm": 1.0}) == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm() == pytest.approx(1.0, rel=1e-5)
    a.grad = torch.tensor([3.0, -0.05])
    clip_gradients([a], {"value": 0.1})
    assert a.grad.tolist() == pytest.approx([0.1, -0.05])


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_keep_last_k_and_skip_a_truncated_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save({"step": step, "w": torch.full((64,), float(step))}, step)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_00000002.pt", "step_00000003.pt"]
    latest = manager.latest()
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # truncated on disk
    assert manager.latest().name == "step_00000002.pt"
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(latest)
    assert load_checkpoint(tmp_path)["step"] == 2  # a folder means its newest valid checkpoint
    (tmp_path / "step_00000009.pt").write_bytes(data)  # no sidecar: an interrupted write
    assert latest_valid(tmp_path).name == "step_00000002.pt"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_strict_load_lists_what_does_not_fit():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(5)])  # keys 0.weight .. 4.bias
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(3, 2)
    state["extra"] = torch.zeros(1)
    fitting = dict(state, **{"0.weight": torch.ones(2, 2)})
    del fitting["extra"]
    load_strictly(model, fitting, "toy")
    assert torch.equal(model[0].weight, torch.ones(2, 2))
    missing = {k: v for k, v in state.items() if not k.endswith("bias")}
    with pytest.raises(ValueError) as error:
        check_fits(missing, model.state_dict(), "the checkpoint does not fit this toy")
    assert str(error.value) == ("the checkpoint does not fit this toy:"
                                "\n  missing: 0.bias, 1.bias, 2.bias, 3.bias, 4.bias"
                                "\n  unexpected: extra"
                                "\n  mis-shaped: 0.weight: checkpoint (3, 2) vs model (2, 2)")
    wide = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(9)])
    with pytest.raises(ValueError, match=r"missing: 0.bias, 0.weight, 1.bias, 1.weight, 2.bias, 2.weight, "
                                         r"3.bias, 3.weight \.\.\. \(18 in all\)$"):
        check_fits({}, wide.state_dict(), "empty")


def test_rng_state_round_trip():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_resumable_sampler_shards_and_restarts_mid_epoch():
    shards = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 5 and sorted(a + b) == list(range(10))
    shards[0].set_epoch(1, start=2)
    assert list(shards[0]) == a[2:] and len(shards[0]) == 3
    shards[0].set_epoch(2)
    assert list(shards[0]) != a  # a new permutation each epoch


# ----------------------------------------------------------------------------- diagnostics
def test_deq_metrics_are_means_of_the_info_dict():
    info = {"abs_lowest": torch.tensor([1e-3, 3e-3]), "rel_lowest": torch.tensor([1e-4, 3e-4]),
            "nstep": torch.tensor([4.0, 6.0]), "nfe": 7, "n_fallback": torch.tensor(1),
            "sradius": torch.tensor(-1.0), "abs_trace": torch.tensor([[1.0, 0.5], [1.0, 0.1]])}
    out = deq_metrics(info)
    assert out == pytest.approx({"deq/abs_lowest": 2e-3, "deq/rel_lowest": 2e-4, "deq/nstep": 5.0,
                                 "deq/nfe": 7.0, "deq/n_fallback": 1.0, "deq/abs_last": 0.3})
    assert deq_metrics({**info, "sradius": torch.tensor([0.9, 0.7])})["deq/sradius"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------- compare_tables
def _load_compare_tables():
    spec = importlib.util.spec_from_file_location("compare_tables", REPO / "scripts" / "compare_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_tables"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_tables_hold_all_seven_tables_with_unique_row_ids():
    ct = _load_compare_tables()
    tables = ct.load_tables()
    assert {f"table{i}" for i in range(1, 8)} <= set(tables)
    assert [len(tables[f"table{i}"]["rows"]) for i in range(1, 8)] == [4, 8, 8, 16, 3, 3, 3]
    mdeq_tiny = next(r for r in tables["table3"]["rows"] if r["id"] == "mdeq_tiny_torchdeq")
    assert mdeq_tiny["values"]["top1"] == 85.7 and mdeq_tiny["reproduce"]


def test_compare_tables_statistics(tmp_path, capsys):
    ct = _load_compare_tables()
    for seed, f1 in enumerate([97.0, 98.4, 97.5]):
        run = {"status": "completed", "project": "ignn", "experiment": "ppi_pg", "seed": seed,
               "metrics": {"test/macro_f1": f1},
               "reported": {"table": "table2", "row": "ignn_ours_pg", "metrics": {"f1": "test/macro_f1"}}}
        (tmp_path / f"r{seed}").mkdir()
        (tmp_path / f"r{seed}" / "results.json").write_text(json.dumps(run))
    for seed, mse in enumerate([0.2, 0.4]):
        run = {"status": "completed", "metrics": {"inv/mse": mse},
               "reported": {"table": "table6", "row": "deq_ddim_torchdeq", "metric": "inv/mse"}}
        (tmp_path / f"d{seed}.json").write_text(json.dumps(run))
    ct.main([str(tmp_path), *[str(p) for p in tmp_path.glob("d*.json")], "--table", "table2", "--table", "table6"])
    out = capsys.readouterr().out
    pg = next(line for line in out.splitlines() if line.startswith("| IGNN (TorchDEQ, PG)"))
    assert pg.split(" | ")[1:7] == ["98.0", "97.5 (n=3)", "-0.5", "98.6", "98.4 (n=3)", "-0.2"] and "3 runs" in pg
    ddim = next(line for line in out.splitlines() if line.startswith("| DEQ-DDIM (TorchDEQ)"))
    assert "0.3 ± 0.14 (n=2)" in ddim and "+0.13" in ddim
    assert "| IGNN (TorchDEQ, IFT) | 97.8 | - |" in out and "no run yet" in out
    assert "| GAT | 97.3 |  |  |" in out and "reported only" in out
