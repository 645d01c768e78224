"""DEQ-INR training and evaluation end to end on tiny signals, and the warm start counted."""
import json

import pytest
import torch

from zoo.common import Run, build_optimizer, build_scheduler, compose, read_metrics
from zoo.deq_inr.data import build_datasets
from zoo.deq_inr.evaluate import evaluate
from zoo.deq_inr.train import (WarmStart, build_model, coordinate_batches, make_train_step, optimizer_options,
                               train)

TINY = ["model.size=1L32D", "train.cpu_threads=1", "logger.wandb.mode=disabled", "log.progress=false",
        "log.every=2"]


@pytest.fixture(autouse=True)
def outputs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.chdir(tmp_path)


def _cfg(experiment, *overrides):
    return compose("deq_inr", [f"+experiment={experiment}", *TINY, *overrides], return_hydra_config=True)


def _run_dir(tmp_path, status="completed"):
    for path in (tmp_path / "outputs").rglob("results.json"):
        if json.loads(path.read_text())["status"] == status:
            return path.parent
    raise AssertionError(f"no {status} run under {tmp_path}")


def test_warm_start_skips_the_solver_after_the_first_step(tmp_path):
    """Step 1 solves from z = 0 (up to f_max_iter f calls) and then takes the 3 phantom-
    gradient steps; every later step starts from the cached z* and calls f exactly 3 times."""
    cfg = _cfg("camera", "data.size=8", "train.steps=4", "train.baselines=[]")
    with Run(cfg, project="deq_inr") as run:
        signal = build_datasets(cfg.data)
        model = build_model(cfg, signal)
        calls = []
        inner_forward = model.f.forward
        model.f.forward = lambda *a, **k: calls.append(1) or inner_forward(*a, **k)
        opt = build_optimizer(model, optimizer_options(cfg))
        warm = WarmStart(len(signal.train_coords), model.width, run.device)
        step = make_train_step(model, signal, run, opt, build_scheduler(opt, cfg.sched, 4), cfg, warm)
        counts, nfes = [], []
        for k in range(1, 5):
            before = len(calls)
            out = step(None, k)
            counts.append(len(calls) - before)
            nfes.append(float(out["deq_info"]["nfe"]))
            if k == 1:
                first_z = warm.z.clone()
    assert counts[0] > 3 + 1 and nfes[0] > 0, counts  # a real solve on step 1
    assert counts[1:] == [3, 3, 3] and nfes[1:] == [0.0, 0.0, 0.0], (counts, nfes)
    assert warm.seen.all() and not torch.equal(first_z, warm.z)


def test_warm_start_with_coordinate_batches():
    warm = WarmStart(6, 2, torch.device("cpu"))
    batches = coordinate_batches(6, 4, seed=0)
    first, second = list(batches(0, 0))
    assert sorted(torch.cat([first, second]).tolist()) == list(range(6))
    assert list(batches(0, 1))[0].tolist() == second.tolist()  # resume mid-epoch
    _, cached = warm.get(first)
    assert not cached
    warm.put(first, torch.ones(len(first), 2))
    z, cached = warm.get(first)
    assert cached and z.sum() == 2 * len(first) and not warm.get(None)[1]
    assert list(coordinate_batches(6, None, 0)(0, 0)) == [None] and list(coordinate_batches(6, None, 0)(0, 1)) == []


def test_camera_run_with_baselines_pictures_and_evaluation(tmp_path):
    cfg = _cfg("camera", "data.size=16", "train.steps=12", "train.baselines=[one_pass,siren]")
    metrics = train(cfg)
    run_dir = _run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test/psnr", "train/psnr", "one_pass/test/psnr", "siren/test/psnr"):
        assert key in results["metrics"] and results["metrics"][key] > 5, key
    curve = [r["train/psnr"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/psnr" in r]
    assert curve[-1] > curve[0] + 1  # the fit improves
    assert results["extra"]["params"] == 2 * 64 + 64 + 32 * 32 + 2 * 32 + 33
    assert results["extra"]["input_scale"] == pytest.approx(8.0)  # 256 at 512 -> 8 at 16
    assert len(results["extra"]["baselines"]["siren"]["curve"]) == 6
    for name in ("reconstruction.png", "psnr_curve.png"):
        assert (run_dir / name).stat().st_size > 1000
    assert metrics["test/psnr"] == results["metrics"]["test/psnr"]

    quiet = ["logger.wandb.mode=disabled", "log.progress=false"]
    out = evaluate(compose("deq_inr", [f"ckpt={run_dir}", "eval.sweep=true", "eval.sweep_iterations=[0,2,30]",
                                       *quiet], return_hydra_config=True))
    assert out["test/psnr"] == pytest.approx(results["metrics"]["test/psnr"], abs=1e-3)
    eval_dir = _run_dir(tmp_path, "evaluated")
    rows = json.loads((eval_dir / "nfe_sweep.json").read_text())
    assert [r["iterations"] for r in rows] == [0, 2, 30]
    assert rows[-1]["rel_residual"] < rows[1]["rel_residual"]  # more iterations, closer to z*
    assert rows[-1]["psnr"] == pytest.approx(out["test/psnr"], abs=1e-3)
    assert (eval_dir / "nfe_sweep.png").is_file()
    evaluate(compose("deq_inr", [f"ckpt={run_dir}", "eval.size=24", *quiet], return_hydra_config=True))
    assert len(list((tmp_path / "outputs").rglob("render.png"))) == 1


@pytest.mark.parametrize("experiment,extra,picture", [
    ("video_offline", ["data.max_frames=2", "deq.f_max_iter=4"], "frames.png"),
    ("audio_offline", ["data.seconds=0.05", "data.sample_rate=8000", "model.input_scale=300"], "waveform.png"),
])
def test_video_and_audio_runs(tmp_path, experiment, extra, picture):
    metrics = train(_cfg(experiment, "train.steps=4", "train.baselines=[one_pass]", *extra))
    assert metrics["test/psnr"] > 0 and metrics["one_pass/test/psnr"] > 0
    assert (_run_dir(tmp_path) / picture).is_file()
