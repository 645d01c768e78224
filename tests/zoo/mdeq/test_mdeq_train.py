"""MDEQ experiments compose to the recipes, a missing dataset stops the run with the
expected layout, and a short training run goes end to end through zoo.common."""
import json

import pytest
import torch

from zoo.common import compose
from zoo.mdeq.evaluate import iteration_sweep
from zoo.mdeq.train import build_model, optimizer_options, train

QUIET = ["logger.wandb.mode=disabled", "log.progress=false"]


@pytest.mark.parametrize("experiment,solver,iters,grad,tau,row", [
    ("cifar_tiny", "broyden", 22, 5, 0.5, "mdeq_tiny_torchdeq"),
    ("cifar_large", "broyden", 18, 5, 0.7, "mdeq_large_torchdeq"),
    ("imagenet", "fixed_point_iter", 26, 5, 1.0, "mdeq_imagenet_torchdeq"),
])
def test_experiments_carry_the_recipes_and_their_table3_row(experiment, solver, iters, grad, tau, row):
    cfg = compose("mdeq", [f"+experiment={experiment}"])
    assert (cfg.deq.f_solver, cfg.deq.f_max_iter, cfg.deq.grad, cfg.deq.tau) == (solver, iters, grad, tau)
    assert cfg.deq.norm_type == "weight_norm"
    assert (cfg.reported.table, cfg.reported.row) == ("table3", row)


def test_digits_options_fit_adam():
    cfg = compose("mdeq", ["+experiment=digits"])
    assert optimizer_options(cfg) == {"name": "adam", "lr": 3e-3, "weight_decay": 0.0}
    assert cfg.reported is None and cfg.data.name == "digits"


def test_cifar_tiny_without_data_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    cfg = compose("mdeq", ["+experiment=cifar_tiny", f"data.root={tmp_path}", *QUIET],
                  return_hydra_config=True)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1(.|\n)*"
                                                r"<root>/cifar-10-batches-py/data_batch_1 \.\.\. data_batch_5"):
        train(cfg)


def test_short_digits_run_writes_results_and_a_loadable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    overrides = ["+experiment=digits", "train.steps=12", "train.batch_size=32", "sched.warmup_steps=2",
                 "model.channels=[8,16]", "model.final_channels=16", "deq.f_max_iter=3", *QUIET]
    cfg = compose("mdeq", overrides, return_hydra_config=True)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/top1"] <= 100.0
    results_file = next((tmp_path / "outputs").rglob("results.json"))
    results = json.loads(results_file.read_text())
    assert results["status"] == "completed" and results["steps"] == 12
    assert results["metrics"]["test/top1"] == pytest.approx(metrics["test/top1"])
    assert results["deq"]["deq/nfe"] == 3
    # The checkpoint reloads into a fresh model and reproduces the reported accuracy.
    from zoo.common import load_checkpoint
    from zoo.mdeq.data import build_datasets

    splits = build_datasets(cfg.data)
    model = build_model(cfg, splits)
    model.load_state_dict(load_checkpoint(results_file.parent, map_location="cpu")["model"])
    rows = iteration_sweep(model, splits.test, torch.device("cpu"), [1, 3], 360)
    assert rows[1]["top1"] == pytest.approx(metrics["test/top1"])
    assert rows[0]["rel_residual"] > rows[1]["rel_residual"]


def test_evaluate_a_torchdeq_checkpoint_on_cifar_fixtures(tmp_path, monkeypatch, cifar_writer,
                                                          torchdeq_state_dict):
    from zoo.mdeq.evaluate import evaluate
    from zoo.mdeq.model import get_size

    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    cifar_writer(tmp_path / "data", n_test=5)
    ckpt = tmp_path / "final_state.pth"
    torch.save(torchdeq_state_dict(get_size("tiny")), ckpt)
    cfg = compose("mdeq", ["+experiment=cifar_tiny", f"data.root={tmp_path / 'data'}", f"ckpt={ckpt}",
                           "ckpt_format=torchdeq", "deq.f_max_iter=4", "data.num_workers=0",
                           "eval.sweep=true", "eval.sweep_iterations=[1,4]", *QUIET],
                  return_hydra_config=True)
    metrics = evaluate(cfg)
    assert metrics["test/top1"] in {0.0, 20.0, 40.0, 60.0, 80.0, 100.0}  # 5 test images
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["status"] == "evaluated"
    sweep = results["extra"]["nfe_sweep"]
    assert [row["iterations"] for row in sweep] == [1, 4]
    assert sweep[1]["top1"] == pytest.approx(metrics["test/top1"])
    assert (next((tmp_path / "outputs").rglob("nfe_sweep.png"))).stat().st_size > 0


@pytest.mark.slow
def test_digits_reaches_the_offline_target_over_three_seeds(tmp_path, monkeypatch):
    """The README's offline claim: median test top-1 >= 97.5% over seeds 0, 1, 2 (~3 min each)."""
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)
    accuracies = []
    for seed in (0, 1, 2):
        cfg = compose("mdeq", ["+experiment=digits", f"seed={seed}", "eval.sweep=false", *QUIET],
                      return_hydra_config=True)
        accuracies.append(train(cfg)["test/top1"])
    assert sorted(accuracies)[1] >= 97.5, accuracies
