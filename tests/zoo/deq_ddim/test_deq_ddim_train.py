"""DEQ-DDIM experiments compose to their recipes, and the digits pipeline runs end to end:
the denoiser is trained once (file lock), sampled both ways and inverted both ways."""
import json
from pathlib import Path

import pytest
import torch

from zoo.common import compose, load_checkpoint
from zoo.deq_ddim.train import load_denoiser, train

QUIET = ["logger.wandb.mode=disabled", "log.progress=false"]
TINY_DDPM = ["train.steps=30", "train.batch_size=16", "train.eval_every=15", "data.heldout=10"]


def test_experiments_select_the_deq_ddim_recipe_and_table6_rows():
    cfg = compose("deq_ddim", ["+experiment=cifar10_inversion"])
    d = cfg.deq
    assert (d.f_solver, d.f_max_iter, d.grad, d.tau) == ("anderson", 15, 1, 0.1)
    assert dict(d.f_solver_kwargs) == {"m": 5, "lam": 0.001}
    assert (cfg.sampling.timesteps, cfg.sampling.skip_type, cfg.model.size) == (1000, "quad", "cifar10")
    assert dict(cfg.inversion.lr) == {"deq": 0.005, "sequential": 0.01} and cfg.inversion.threshold == 0.5
    assert [(r.table, r.row) for r in cfg.reported] == [("table6", "ddim"), ("table6", "deq_ddim_torchdeq")]
    # another preset replaces the whole recipe; deq.<key>= wins over it
    cfg = compose("deq_ddim", ["+experiment=digits_inversion", "deq=deq_ddim_fixed_point", "deq.f_max_iter=7"])
    assert (cfg.deq.f_solver, cfg.deq.f_max_iter) == ("fixed_point_iter", 7)
    assert list(cfg.inversion.timesteps) == [20, 100] and cfg.inversion.threshold == 0.01


def test_cifar10_inversion_without_a_checkpoint_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    cfg = compose("deq_ddim", ["+experiment=cifar10_inversion", *QUIET], return_hydra_config=True)
    with pytest.raises(ValueError, match="denoiser.ckpt"):
        train(cfg)


@pytest.fixture(scope="module")
def digits_denoiser(tmp_path_factory):
    """A digits_ddpm run of 30 steps: (its results, the denoiser file)."""
    root = tmp_path_factory.mktemp("ddpm")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_OUTPUTS", str(root / "outputs"))
    torch.set_num_threads(1)
    cfg = compose("deq_ddim", ["+experiment=digits_ddpm", *TINY_DDPM, *QUIET], return_hydra_config=True)
    train(cfg)
    results = json.loads(next((root / "outputs").rglob("results.json")).read_text())
    ckpt = Path(cfg.denoiser.ckpt)  # resolved while ZOO_OUTPUTS points here (it is ${oc.env:ZOO_OUTPUTS})
    mp.undo()
    assert ckpt.is_file() and root in ckpt.parents
    return results, ckpt


def test_digits_ddpm_loss_falls_and_the_denoiser_file_is_a_zoo_checkpoint(digits_denoiser):
    results, ckpt = digits_denoiser
    assert results["status"] == "completed" and results["steps"] == 30
    losses = [json.loads(line)["train/loss"] for line in
              (Path(results["run_dir"]) / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert losses[-1] < 0.7 * losses[0]
    state = load_checkpoint(ckpt)
    assert state["project"] == "deq_ddim" and state["experiment"] == "digits_ddpm"
    assert state["config"]["model"]["size"] == "digits"


def test_a_missing_denoiser_is_trained_once_under_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    from zoo.common import Run

    cfg = compose("deq_ddim", ["+experiment=digits_sampling", "train.steps=3", "train.batch_size=8",
                               "train.eval_every=0", *QUIET], return_hydra_config=True)
    assert not Path(cfg.denoiser.ckpt).exists()
    with Run(cfg, project="deq_ddim") as run:
        first, trained = load_denoiser(cfg, run)
        assert trained and Path(cfg.denoiser.ckpt).is_file() and Path(cfg.denoiser.ckpt + ".lock").exists()
        second, trained_again = load_denoiser(cfg, run)
    assert not trained_again and not first.training
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="digits_ddpm"):
        cfg.denoiser.train_if_missing = False
        cfg.denoiser.ckpt = str(tmp_path / "none.pt")
        with Run(cfg, project="deq_ddim") as run:
            load_denoiser(cfg, run)


def test_digits_sampling_writes_trajectory_png_and_fixed_point_is_exact_after_T(digits_denoiser, tmp_path,
                                                                                 monkeypatch):
    _, ckpt = digits_denoiser
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    cfg = compose("deq_ddim", ["+experiment=digits_sampling", f"denoiser.ckpt={ckpt}", "sampling.batch=2",
                               "sampling_study.timesteps=[5]", "sampling_study.dtypes=[float64]", *QUIET],
                  return_hydra_config=True)
    metrics = train(cfg)
    run_dir = next((tmp_path / "outputs").rglob("results.json")).parent
    assert (run_dir / "trajectory.png").stat().st_size > 10_000
    # plain fixed-point iteration on the nilpotent joint system: exact after T iterations
    assert metrics["T5/float64/fixed_point_iter/best_diff"] < 1e-10
    assert 1 <= metrics["T5/float64/fixed_point_iter/iters_to_target"] <= 5
    rows = json.loads((run_dir / "results.json").read_text())["extra"]["sampling_rows"]
    assert {r["solver"] for r in rows} == {"anderson", "fixed_point_iter"} and len(rows[0]["diffs"]) == 5


def test_digits_inversion_lowers_the_loss_both_ways_and_writes_inversion_png(digits_denoiser, tmp_path,
                                                                            monkeypatch):
    _, ckpt = digits_denoiser
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    cfg = compose("deq_ddim", ["+experiment=digits_inversion", f"denoiser.ckpt={ckpt}", "data.heldout=10",
                               "data.num_targets=2", "inversion.timesteps=[5]", "inversion.max_steps=6",
                               "inversion.threshold=1e-9", *QUIET], return_hydra_config=True)
    metrics = train(cfg)
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert (Path(results["run_dir"]) / "inversion.png").stat().st_size > 10_000
    for method in ("deq", "sequential"):
        for image in results["extra"]["inversion"][f"T5/{method}"]:
            assert image["steps"] == 6 and min(image["losses"]) < image["losses"][0]
    assert -1.0 <= metrics["T5/grad_cosine_pg_vs_exact"] <= 1.0
    assert metrics["T5/sequential/rel_time"] == 1.0


def test_evaluate_compares_the_deq_with_sequential_sampling(digits_denoiser, tmp_path, monkeypatch):
    from zoo.deq_ddim.evaluate import evaluate

    _, ckpt = digits_denoiser
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    cfg = compose("deq_ddim", [f"ckpt={ckpt}", "sampling.timesteps=8", "sampling.dtype=float64",
                               "sampling.batch=2", "deq=deq_ddim_fixed_point", "deq.eval_f_max_iter=8", "deq.f_tol=1e-14",
                               "eval.sweep_iterations=[1,8]", *QUIET], return_hydra_config=True)
    metrics = evaluate(cfg)
    assert metrics["eval/max_abs_diff"] < 1e-10 and metrics["eval/latents"] == 8
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert results["status"] == "evaluated"
    rows = results["extra"]["nfe_sweep"]
    assert rows[0]["max_abs_diff"] > 1e-3 > 1e-10 > rows[1]["max_abs_diff"]
    assert (Path(results["run_dir"]) / "nfe_sweep.png").is_file()


@pytest.mark.slow
def test_cifar10_inversion_runs_end_to_end_on_fixtures(tmp_path, monkeypatch):
    """Table 6's experiment at paper size (the 35.7M UNet, loaded through the converter
    from a DataParallel state dict) on a CIFAR-10 pickle fixture, cut to T=3, one Adam
    step and 2 Anderson iterations: results.json names both Table 6 rows."""
    from zoo.common.cifar import write_cifar10
    from zoo.deq_ddim.model import build_unet

    write_cifar10(tmp_path / "cifar", n_train=2, n_test=1)
    torch.manual_seed(0)
    ckpt = tmp_path / "model-790000.ckpt"
    torch.save({f"module.{k}": v for k, v in build_unet("cifar10").state_dict().items()}, ckpt)
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    cfg = compose("deq_ddim", ["+experiment=cifar10_inversion", f"data.root={tmp_path / 'cifar'}",
                               f"denoiser.ckpt={ckpt}", "sampling.timesteps=3", "inversion.timesteps=[3]",
                               "inversion.max_steps=1", "deq.f_max_iter=2", *QUIET], return_hydra_config=True)
    metrics = train(cfg)
    results = json.loads(next((tmp_path / "outputs").rglob("results.json")).read_text())
    assert [r["row"] for r in results["reported"]] == ["ddim", "deq_ddim_torchdeq"]
    for method in ("deq", "sequential"):
        assert metrics[f"T3/{method}/steps"] == 1 and metrics[f"T3/{method}/final_loss"] > 0
    assert results["extra"]["params"] == 35_746_307
