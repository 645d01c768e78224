"""DEQ-Flow experiments compose to the recipes, a missing dataset stops the run with the
layouts, the loss falls, and a short offline run goes end to end (train, then evaluate.py)."""
import json

import pytest
import torch

from zoo.common import MissingDataError, build_optimizer, build_scheduler, compose
from zoo.deq_flow.metrics import flow_loss
from zoo.deq_flow.model import DEQFlow
from zoo.deq_flow.synthetic import SyntheticFlow
from zoo.deq_flow.train import build_model, train

QUIET = ["logger.wandb.mode=disabled", "log.progress=false"]


@pytest.mark.parametrize("experiment,solver,iters,n_states,grad,size,all_grad,row", [
    ("chairs", "simple_fixed_point_iter", 36, 6, 1, "B", False, None),
    ("chairs_h", "simple_fixed_point_iter", 36, 6, 1, "H", False, None),
    ("things", "simple_fixed_point_iter", 40, 2, 3, "B", True, "deq_flow_b_torchdeq"),
    ("things_h", "simple_fixed_point_iter", 40, 2, 3, "H", True, "deq_flow_h_torchdeq"),
    ("things_h_3x", "simple_fixed_point_iter", 40, 2, 3, "H", True, "deq_flow_h_torchdeq_3x"),
    ("sintel_eval", "fixed_point_iter", 40, 1, 1, "B", False, "deq_flow_b_torchdeq"),
    ("kitti_eval_h", "fixed_point_iter", 40, 1, 1, "H", False, "deq_flow_h_torchdeq"),
    ("synthetic", "fixed_point_iter", 6, 2, 3, "cpu", False, None),
])
def test_experiments_carry_the_recipes_and_their_table4_row(experiment, solver, iters, n_states, grad, size,
                                                            all_grad, row):
    cfg = compose("deq_flow", [f"+experiment={experiment}"])
    d = cfg.deq
    assert (d.f_solver, d.f_max_iter, d.n_states, d.grad, d.gamma) == (solver, iters, n_states, grad, 0.8)
    assert (cfg.model.size, cfg.model.all_grad, cfg.model.freeze_bn) == (size, all_grad, all_grad)
    assert (cfg.reported.row if cfg.reported else None) == row
    if cfg.reported:
        assert cfg.reported.table == "table4"


def test_deq_eval_budget_of_the_recipes():
    assert compose("deq_flow", ["+experiment=things"]).deq.eval_factor == 1.5          # 60 steps
    assert compose("deq_flow", ["+experiment=things_h_3x"]).deq.eval_factor == 3.0     # 120 steps


def test_a_deq_preset_on_the_command_line_replaces_the_recipe():
    cfg = compose("deq_flow", ["+experiment=synthetic", "deq=deq_flow_chairs", "deq.f_max_iter=12"])
    assert (cfg.deq.f_solver, cfg.deq.n_states, cfg.deq.f_max_iter) == ("simple_fixed_point_iter", 6, 12)


def test_chairs_without_data_names_both_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    cfg = compose("deq_flow", ["+experiment=chairs", f"data.root={tmp_path}", *QUIET], return_hydra_config=True)
    with pytest.raises(MissingDataError, match=r"FlyingChairs/data(.|\n)*FlyingChairs_release/data"):
        train(cfg)


def test_the_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DEQFlow("cpu", deq=dict(f_solver="fixed_point_iter", f_max_iter=4, n_states=2, grad=1)).train()
    batch = [torch.stack(t) for t in zip(*[SyntheticFlow(2, size=(64, 64), seed=0)[i] for i in range(2)])]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        flows, _, _ = model(batch[0], batch[1])
        loss = flow_loss(flows, batch[2], batch[3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_short_offline_run_writes_results_pictures_and_evaluates_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    small = ["+experiment=synthetic", "train.time_budget_min=null", "train.steps=2", "train.batch_size=2",
             "data.image_size=[64,64]", "data.val_size=3", "data.seq_size=2", "eval.sweep_iterations=[1,3]",
             "eval.examples=1", "train.eval_batch_size=2", "deq.f_max_iter=4", *QUIET]
    metrics = train(compose("deq_flow", small, return_hydra_config=True))
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 2
    extra = results.get("extra", results)
    assert {"val/aepe", "motorcycle/aepe", "val/3px"} <= set(results["metrics"])
    assert extra["zero_flow"]["val/aepe"] > 0 and extra["zero_flow"]["motorcycle/aepe"] > 4
    assert [r["iterations"] for r in extra["nfe_sweep"]] == [1, 3]
    assert {"warm_start/cold_nstep", "warm_start/warm_nstep"} <= set(extra["warm_start"])
    assert (run_dir / "flow_examples.png").stat().st_size > 0 and (run_dir / "nfe_sweep.png").exists()
    # evaluate.py on the run directory, at the training's eval budget: the same AEPE
    from zoo.deq_flow.evaluate import run_evaluation

    again = run_evaluation(compose("deq_flow", [f"ckpt={run_dir}", "eval.sweep=false", "eval.examples=0",
                                                "eval.warm_start_check=false", *QUIET],
                                   return_hydra_config=True))
    assert again["val/aepe"] == pytest.approx(metrics["val/aepe"], rel=1e-5)


def test_a_time_budget_ends_the_run_when_its_clock_says_so(tmp_path, monkeypatch):
    """A fake clock that advances 1 s at every reading: the probe steps read 1 s each, so
    the 12 s budget calibrates to 12 steps (cap 19); the training reads it twice a step (the
    schedule, then the stop test), so the budget is spent after 6 steps, and step k + 1 runs
    at the lr of step 2k - 1 of the 12-step schedule."""
    import zoo.deq_flow.train as flow_train

    ticks = iter(range(10 ** 6))
    monkeypatch.setitem(flow_train.CLOCKS, "wall", lambda: float(next(ticks)))
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    small = ["+experiment=synthetic", "train.time_budget_min=0.2", "train.budget_clock=wall", "train.batch_size=2",
             "data.image_size=[64,64]", "data.val_size=2", "eval.sets=[val]", "eval.sweep=false",
             "eval.warm_start_check=false", "eval.examples=0", "train.eval_batch_size=2", "deq.f_max_iter=2",
             "log.every=1", *QUIET]
    cfg = compose("deq_flow", small, return_hydra_config=True)
    train(cfg)
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 6
    assert results.get("extra", results)["train_steps"] == 6
    lrs = [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "adamw", "lr": 8e-4})
    sched, by_step = build_scheduler(opt, cfg.sched, 12), []
    for _ in range(12):
        by_step.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([by_step[0], by_step[1], by_step[3], by_step[5], by_step[7], by_step[9]])


def test_evaluate_a_published_checkpoint_on_sintel_fixtures(tmp_path, monkeypatch, flow_trees,
                                                            upstream_state_dict):
    from zoo.deq_flow.evaluate import run_evaluation

    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    flow_trees["sintel"](tmp_path / "data", h=60, w=64)  # 60 -> padded to 64 (Sintel mode)
    ckpt = tmp_path / "deq-flow-B-things-2.pth"
    torch.save(upstream_state_dict("B"), ckpt)
    cfg = compose("deq_flow", ["+experiment=sintel_eval", f"ckpt={ckpt}", "ckpt_format=torchdeq",
                               f"data.root={tmp_path / 'data'}", "deq.eval_f_max_iter=3", "eval.warm_start=true",
                               *QUIET], return_hydra_config=True)
    metrics = run_evaluation(cfg)
    assert metrics["sintel_clean/aepe"] > 0 and metrics["sintel_final/aepe"] > 0
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["status"] == "evaluated"
    assert results["reported"]["row"] == "deq_flow_b_torchdeq"


def test_build_model_of_the_raft_baseline():
    cfg = compose("deq_flow", ["+experiment=synthetic_raft"])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 990162  # torchvision raft_small
