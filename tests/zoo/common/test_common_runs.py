"""The run runtime end to end on the toy DEQ project, in subprocesses as a user runs it.

Train -> every artefact, evaluate reproduces the final metric; SIGTERM + resume=auto ->
the parameters of an uninterrupted run, also when the newest checkpoint is truncated;
torchrun with 2 CPU ranks -> identical parameters; a 2-job multirun -> compare_tables.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.common.results import REQUIRED_FIELDS

TOY = Path(__file__).parent / "toy_project"
REPO = Path(__file__).resolve().parents[3]
PYTHON = sys.executable


def run_toy(script, *overrides, outputs, cwd, torchrun=False, timeout=240, python_path=None):
    """Runs a toy script from ``cwd`` with outputs under ``outputs``; returns the process."""
    python_path = os.pathsep.join(map(str, filter(None, [REPO, python_path, os.environ.get("PYTHONPATH")])))
    env = {**os.environ, "ZOO_OUTPUTS": str(outputs), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "HYDRA_FULL_ERROR": "1", "PYTHONPATH": python_path}
    if torchrun:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TOY / script)]
    else:
        cmd = [PYTHON, str(TOY / script)]
    proc = subprocess.run(cmd + list(overrides), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_params(run_dir, rank=0):
    return torch.load(Path(run_dir) / f"final_params_rank{rank}.pt")


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 12-step run (wandb offline), started from an unrelated directory."""
    outputs = tmp_path_factory.mktemp("outputs")
    cwd = tmp_path_factory.mktemp("elsewhere")
    run_toy("toy_train.py", "+experiment=tiny", "device=cpu", "logger.wandb.mode=offline", outputs=outputs, cwd=cwd)
    experiment_dir = outputs / "toy" / "tiny"
    (run_dir,) = [p for p in experiment_dir.iterdir() if p.name != "latest"]
    return outputs, run_dir


@pytest.mark.timeout(300)
def test_training_writes_every_artefact(trained):
    outputs, run_dir = trained
    assert (outputs / "toy" / "tiny" / "latest").resolve() == run_dir.resolve()
    assert (run_dir / "config.yaml").read_text().count("f_max_iter: 12") == 1  # resolved config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert train[-1]["train/loss"] < train[0]["train/loss"]          # training lowers the loss
    assert all(r["deq/abs_lowest"] < 1e-3 and r["deq/nstep"] >= 1 and "deq/n_fallback" in r for r in train)
    assert all(r["time/step_s"] > 0 and r["mem/peak_mb"] > 0 for r in train)
    assert (run_dir / "checkpoints" / "step_00000012.pt").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))  # offline, no account
    results = json.loads((run_dir / "results.json").read_text())
    assert set(REQUIRED_FIELDS) <= set(results)
    assert results["experiment"] == "tiny" and results["status"] == "completed" and results["steps"] == 12
    assert results["reported"] == {"table": "toy_table", "row": "toy_deq", "metrics": {"acc": "eval/accuracy"}}
    assert 0.0 <= results["metrics"]["eval/accuracy"] <= 1.0 and results["deq"]["deq/nfe"] >= 1
    assert results["versions"]["torch"] == torch.__version__ and results["device"]["type"] == "cpu"
    assert results["git_commit"] and Path(results["config_path"]).is_file()


@pytest.mark.timeout(300)
def test_evaluating_the_checkpoint_reproduces_the_final_metric(trained, tmp_path):
    outputs, run_dir = trained
    run_toy("toy_evaluate.py", "+experiment=tiny", "device=cpu", f"ckpt={run_dir}", outputs=outputs, cwd=tmp_path)
    trained_results = json.loads((run_dir / "results.json").read_text())
    (eval_results_path,) = [p for p in (outputs / "toy" / "tiny").glob("*/results.json")
                            if p.parent.name not in ("latest", run_dir.name)]
    evaluated = json.loads(eval_results_path.read_text())
    assert evaluated["status"] == "evaluated"
    for key in ("eval/accuracy", "eval/loss"):
        assert evaluated["metrics"][key] == pytest.approx(trained_results["metrics"][key], abs=1e-6)
    assert (outputs / "toy" / "tiny" / "latest").resolve() == run_dir.resolve()  # still the training run


@pytest.mark.timeout(300)
def test_sigterm_then_resume_ends_with_the_uninterrupted_parameters(trained, tmp_path):
    _, reference = trained
    outputs = tmp_path / "outputs"
    run_toy("toy_train.py", "+experiment=tiny", "device=cpu", "checkpoint.signal_at_step=5", "checkpoint.every=2",
            outputs=outputs, cwd=tmp_path)
    (killed,) = [p for p in (outputs / "toy" / "tiny").iterdir() if p.name != "latest"]
    assert not (killed / "results.json").exists() and (killed / "preempted_params.pt").is_file()
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pt")) == [f"step_0000000{s}.pt" for s in (2, 4, 5)]
    newest = checkpoints / "step_00000005.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated on disk: resume must use step 4
    run_toy("toy_train.py", "+experiment=tiny", "device=cpu", "resume=auto", outputs=outputs, cwd=tmp_path)
    resumed = (outputs / "toy" / "tiny" / "latest").resolve()
    assert resumed != killed.resolve()
    results = json.loads((resumed / "results.json").read_text())
    assert results["resumed_from"] == str(checkpoints / "step_00000004.pt")
    assert (results["steps"], results["final_step"]) == (8, 12)  # this session's steps, the run's last step
    assert_same_params(final_params(resumed), final_params(reference))


@pytest.mark.timeout(300)
def test_a_compiled_run_trains_as_eager_and_its_checkpoint_loads_into_eager(trained, tmp_path):
    """compile=default through Run.wrap, with compile_backend=aot_eager (inductor's graphs
    with eager kernels, quick enough here; inductor itself: test_compile_run.py, slow):
    the 12 steps end at the eager run's parameters, the checkpoint keeps the eager key
    names, and an eager evaluation of it gives the compiled run's metric."""
    _, reference = trained
    outputs = tmp_path / "outputs"
    run_toy("toy_train.py", "+experiment=tiny", "device=cpu", "compile=default", "compile_backend=aot_eager",
            outputs=outputs, cwd=tmp_path)
    (run_dir,) = [p for p in (outputs / "toy" / "tiny").iterdir() if p.name != "latest"]
    checkpoint = torch.load(run_dir / "checkpoints" / "step_00000012.pt", weights_only=False)
    assert checkpoint["model"].keys() == final_params(reference).keys()  # no "_orig_mod." prefix
    compiled, eager = final_params(run_dir), final_params(reference)
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-4, atol=1e-6), key
    assert "compile: default" in (run_dir / "config.yaml").read_text()  # saved with the run
    run_toy("toy_evaluate.py", "+experiment=tiny", "device=cpu", "compile=none", f"ckpt={run_dir}",
            outputs=outputs, cwd=tmp_path)
    (evaluated,) = [p for p in (outputs / "toy" / "tiny").glob("*/results.json")
                    if p.parent.name not in ("latest", run_dir.name)]
    trained_metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert json.loads(evaluated.read_text())["metrics"]["eval/accuracy"] == pytest.approx(
        trained_metrics["eval/accuracy"], abs=1e-6)


@pytest.mark.timeout(300)
def test_submitit_preemption_requeues_and_resumes_in_the_same_job_dir(trained, tmp_path):
    """SLURM's path, on submitit's local executor: SIGUSR2 -> checkpoint -> requeue -> resume."""
    _, reference = trained
    outputs = tmp_path / "outputs"
    run_toy("toy_train.py", "-m", "hydra/launcher=local", "+experiment=tiny", "device=cpu",
            "checkpoint.signal_at_step=5", "checkpoint.signal=SIGUSR2", outputs=outputs, cwd=tmp_path,
            python_path=TOY)  # the pickled job imports toy_model by name
    (job_dir,) = (outputs / "toy" / "tiny").glob("multirun_*/0")
    log = (job_dir / "metrics.jsonl").read_text()
    assert '"event": "preempted", "signal": 12' in log and '"event": "resumed"' in log
    (submitit_log,) = job_dir.parent.glob(".submitit/*/*_0_log.out")
    assert "Requeued job" in submitit_log.read_text()
    assert json.loads((job_dir / "results.json").read_text())["resumed_from"].endswith("step_00000005.pt")
    assert_same_params(final_params(job_dir), final_params(reference))


@pytest.mark.timeout(300)
def test_torchrun_two_cpu_ranks_stop_together_resume_and_end_identical(tmp_path):
    outputs = tmp_path / "outputs"
    common = ["+experiment=tiny", "device=cpu", "train.steps=4", "train.eval_every=0"]
    # only rank 1 is signalled; both ranks must stop after the same step and rank 0 saves it
    run_toy("toy_train.py", *common, "checkpoint.signal_at_step=2", "checkpoint.signal_rank=1",
            outputs=outputs, cwd=tmp_path, torchrun=True)
    runs = [p for p in (outputs / "toy" / "tiny").iterdir() if p.name != "latest"]
    assert len(runs) == 1  # rank 1 wrote no run directory of its own
    stopped = runs[0]
    assert [p.name for p in (stopped / "checkpoints").glob("*.pt")] == ["step_00000002.pt"]
    run_toy("toy_train.py", *common, "resume=auto", outputs=outputs, cwd=tmp_path, torchrun=True)
    run_dir = (outputs / "toy" / "tiny" / "latest").resolve()
    assert_same_params(final_params(run_dir, 0), final_params(run_dir, 1))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["final_step"] == 4 and results["steps"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 4]  # written once (rank 0 only): resumed event, a train log, the evaluation


@pytest.mark.timeout(300)
def test_multirun_of_two_seeds_and_compare_tables(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    run_toy("toy_train.py", "-m", "+experiment=tiny", "device=cpu", "seed=0,1", outputs=outputs, cwd=tmp_path)
    results = sorted((outputs / "toy" / "tiny").glob("multirun_*/*/results.json"))
    assert [json.loads(p.read_text())["seed"] for p in results] == [0, 1]
    latest = outputs / "toy" / "tiny" / "latest"
    assert latest.resolve() == results[0].parent.parent.resolve()  # the multirun folder, not its last job
    accuracies = [json.loads(p.read_text())["metrics"]["eval/accuracy"] for p in results]

    spec = importlib.util.spec_from_file_location("compare_tables_cli", REPO / "scripts" / "compare_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_tables_cli"] = module
    spec.loader.exec_module(module)
    png = tmp_path / "table.png"
    assert module.main([str(outputs), "--tables", str(TOY / "toy_tables.yaml"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| Toy DEQ (ours)"))
    mean = sum(accuracies) / 2
    assert f"{mean:.4g} ± " in row and "2 runs" in row and f"{mean - 0.7:+.3g}" in row
    assert f"| {max(accuracies):.4g} (n=2) |" in row  # the best-over-seeds column, with its run count
    assert "| Toy DEQ, IFT (ours) | 0.75 | - |" in out and "reported only" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_toy_trains_on_cuda_with_mixed_precision(tmp_path, amp):
    outputs = tmp_path / "outputs"
    run_toy("toy_train.py", "+experiment=tiny", "device=auto", f"amp={amp}", outputs=outputs, cwd=tmp_path)
    run_dir = (outputs / "toy" / "tiny" / "latest").resolve()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["device"]["type"] == "cuda" and results["versions"]["cuda"]
    assert 0 < results["peak_memory_mb"] < 1024  # CUDA max_memory_allocated of a tiny model
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    assert train[-1] < train[0]
    assert 0.0 <= results["metrics"]["eval/accuracy"] <= 1.0
