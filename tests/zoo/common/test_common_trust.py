"""Runs a researcher can trust: resume chooses the same run only, presets compose, the
evaluation starts from the checkpoint's config, bad options name themselves, the console
says what a run does, and compare_tables counts reproductions only."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from zoo.common import compose, evaluate_checkpoint, save_checkpoint
from zoo.common.config_check import check_runtime_options
from zoo.common.config_keys import differences
from zoo.common.evaluation import effective_config
from zoo.common.hydra_main import check_deq_overrides
from zoo.common.optim import build_scheduler
from zoo.common.resume import choose

REPO = Path(__file__).resolve().parents[3]
TOY = Path(__file__).parent / "toy_project"
CONFIGS = REPO / "configs"


def toy_cfg(*overrides):
    return compose("toy", ["+experiment=tiny", *overrides], config_dir=TOY / "configs", return_hydra_config=True)


def plain(cfg):
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def fake_run(folder, cfg, step, completed):
    """A run directory as Run writes it: config.yaml, a checkpoint, results.json when completed."""
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(plain(cfg)), folder / "config.yaml")
    save_checkpoint({"model": {}, "step": step}, folder / "checkpoints" / f"step_{step:08d}.pt")
    if completed:
        (folder / "results.json").write_text(json.dumps({"status": "completed"}))
    return folder


# ------------------------------------------------------------------------------ resume
def test_resume_auto_skips_another_seeds_run_and_says_why(tmp_path):
    experiment = tmp_path / "toy" / "tiny"
    fake_run(experiment / "2026-01-01_seed0", toy_cfg("seed=0"), step=12, completed=True)
    said = []
    ours = plain(toy_cfg("seed=1", "resume=auto"))
    assert choose("auto", ours, experiment / "new", 12, say=said.append) is None
    assert len(said) == 1 and "seed: 0 -> 1" in said[0] and "2026-01-01_seed0" in said[0]


def test_resume_auto_continues_an_unfinished_run_of_the_same_config_only(tmp_path):
    experiment = tmp_path / "toy" / "tiny"
    fake_run(experiment / "a_other_iters", toy_cfg("deq.f_max_iter=8"), step=4, completed=False)
    same = fake_run(experiment / "b_same", toy_cfg("device=cpu", "log.every=5"), step=4, completed=False)
    ours = plain(toy_cfg("resume=auto"))
    said = []
    found = choose("auto", ours, experiment / "new", 12, say=said.append)
    assert found == same / "checkpoints" / "step_00000004.pt"


def test_a_completed_run_is_resumed_only_to_extend_it(tmp_path):
    experiment = tmp_path / "toy" / "tiny"
    done = fake_run(experiment / "done", toy_cfg(), step=12, completed=True)
    said = []
    assert choose("auto", plain(toy_cfg()), experiment / "new", 12, say=said.append) is None
    assert "completed at step 12" in said[0]
    assert choose("auto", plain(toy_cfg("train.steps=20")), experiment / "new", 20, say=said.append) \
        == done / "checkpoints" / "step_00000012.pt"


def test_resume_of_a_named_run_with_another_config_is_an_error_pointing_at_init_from(tmp_path):
    other = fake_run(tmp_path / "other", toy_cfg("seed=3"), step=4, completed=False)
    with pytest.raises(ValueError, match="init_from="):
        choose(str(other), plain(toy_cfg()), tmp_path / "new", 12)


def test_the_own_directory_is_always_continued(tmp_path):
    own = fake_run(tmp_path / "own", toy_cfg("seed=5"), step=6, completed=False)
    assert choose(None, plain(toy_cfg()), own, 12) == own / "checkpoints" / "step_00000006.pt"


# ------------------------------------------------------------------------------ presets
PROJECTS = sorted(p.parent.name for p in CONFIGS.glob("*/config.yaml"))
PRESETS = sorted(p.stem for p in (CONFIGS / "deq").glob("*.yaml"))
STRUCTURAL = {"norm_type", "norm_clip", "norm_clip_value", "norm_no_scale", "norm_target_norm",
              "sn_n_power_iters"}


def composer(config_dir):
    """Composes many configs of one config folder in one Hydra context (fast)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from zoo.common.hydra_main import register_search_path

    register_search_path()
    return initialize_config_dir(config_dir=str(config_dir), version_base="1.3"), hydra_compose


@pytest.fixture(scope="module")
def presets_alone():
    context, hydra_compose = composer(CONFIGS)
    with context:
        return {p: OmegaConf.to_container(hydra_compose(overrides=[f"+deq={p}"]).deq) for p in PRESETS}


def inline_deq_keys(path):
    """The `deq:` keys a config file sets inline (after its defaults list, so they beat any preset)."""
    node = OmegaConf.load(path)
    return set((node.get("deq") or {}).keys())


EXPERIMENTS = [(p, e.stem) for p in PROJECTS for e in sorted((CONFIGS / p / "experiment").glob("*.yaml"))]


@pytest.mark.parametrize("project,experiment", EXPERIMENTS)
def test_an_experiment_sets_only_structural_deq_options_inline(project, experiment):
    """With every preset: a preset sets recipe keys only, and the experiment (or its
    project's config) can override a preset's key only inline, so no inline recipe key
    means `deq=<any preset>` replaces the whole recipe (the composition test below checks one)."""
    for path in (CONFIGS / project / "config.yaml", CONFIGS / project / "experiment" / f"{experiment}.yaml"):
        recipe = inline_deq_keys(path) - STRUCTURAL
        assert not recipe, f"{path.relative_to(REPO)} sets DEQ recipe keys inline: {sorted(recipe)}; " \
                           "put them in a configs/deq/ preset selected with `override /deq:`"


@pytest.mark.parametrize("project", PROJECTS)
def test_a_preset_on_the_command_line_replaces_the_experiments_whole_recipe(project, presets_alone):
    experiments = sorted(e.stem for e in (CONFIGS / project / "experiment").glob("*.yaml"))
    context, hydra_compose = composer(CONFIGS / project)
    with context:
        for experiment in experiments:
            for preset in ("fp_pg", "anderson_ift"):
                cfg = hydra_compose("config", overrides=[f"+experiment={experiment}", f"deq={preset}"])
                deq = OmegaConf.to_container(cfg.deq)
                recipe_diff = {k: v for k, v in differences(presets_alone[preset], deq, ignore=()).items()
                               if k.split(".")[0] not in STRUCTURAL}
                assert not recipe_diff, f"{project}/{experiment} deq={preset}: set inline: {recipe_diff}"
            deq = hydra_compose("config", overrides=[f"+experiment={experiment}", "deq=fp_pg",
                                                     "deq.f_max_iter=3"]).deq
            assert deq.f_max_iter == 3 and deq.grad == 5, f"{project}/{experiment}"


def test_mdeq_experiments_keep_their_recipes_without_a_preset_override():
    tiny = compose("mdeq", ["+experiment=cifar_tiny"]).deq
    assert (tiny.f_solver, tiny.f_max_iter, tiny.grad, tiny.tau) == ("broyden", 22, 5, 0.5)
    anderson = compose("mdeq", ["+experiment=cifar_tiny", "deq=anderson_ift"]).deq
    assert (anderson.f_solver, anderson.ift) == ("anderson", True)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("spelling,expected", [("no", False), ("off", False), ("yes", True), ("on", True)])
def test_boolean_words_mean_what_they_say_in_the_run_config(spelling, expected):
    cfg = toy_cfg(f"deq.ift={spelling}")
    check_runtime_options(cfg)
    assert cfg.deq.ift is expected


@pytest.mark.parametrize("override,option", [("train.steps=abc", "train.steps"), ("optim.lr=abc", "optim.lr"),
                                             ("train.steps=-5", "train.steps"), ("deq.ift=maybe", "deq.ift"),
                                             ("compile=fast", "compile"), ("compile_backend=tvm", "compile_backend")])
def test_a_bad_option_names_itself(override, option):
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        check_runtime_options(toy_cfg(override))


@pytest.mark.parametrize("overrides,message", [
    (["compile=reduce-overhead", "compile_backend=aot_eager"], "compile=reduce-overhead is for compile_backend=inductor"),
    (["compile=default", "compile_backend=eager", "+compile_options.cpp_wrapper=true"], "compile_options is for"),
    (["compile=max-autotune", "+compile_options.cpp_wrapper=true"], "compile_options go with compile=default"),
])
def test_compile_options_that_torch_compile_would_refuse_are_refused_first(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_runtime_options(toy_cfg(*overrides))
    check_runtime_options(toy_cfg("compile=default", "+compile_options.cpp_wrapper=true"))  # fine
    check_runtime_options(toy_cfg("compile=default", "compile_backend=aot_eager"))


@pytest.mark.parametrize("overrides,expected", [
    (["compile=default"], {"backend": "inductor"}),
    (["compile=max-autotune"], {"backend": "inductor", "mode": "max-autotune"}),
    (["compile=default", "compile_backend=aot_eager"], {"backend": "aot_eager"}),
    (["compile=default", "+compile_options.cpp_wrapper=true"], {"backend": "inductor", "options": {"cpp_wrapper": True}}),
    (["compile=default", "+compile_options.cpp.use_decompose_tanh=true"],
     {"backend": "inductor", "options": {"cpp.use_decompose_tanh": True}}),  # inductor's dotted name
])
def test_run_wrap_passes_the_compile_options_to_torch_compile(monkeypatch, overrides, expected):
    from types import SimpleNamespace

    from zoo.common import Run

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs) or model)
    run = SimpleNamespace(cfg=toy_cfg(*overrides), device=torch.device("cpu"), dist=SimpleNamespace(enabled=False))
    Run.wrap(run, torch.nn.Linear(2, 2))
    assert calls == [expected]


def test_a_misspelt_deq_option_gets_did_you_mean():
    with pytest.raises(SystemExit, match="did you mean 'f_solver'"):
        check_deq_overrides(["+experiment=digits", "deq.f_solverr=anderson"])
    check_deq_overrides(["deq.f_solver=anderson", "deq=fp_pg"])  # fine


def test_warmup_may_be_a_fraction_of_the_run():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, {"name": "constant", "warmup_steps": 0.1}, total_steps=50)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


# ------------------------------------------------------------------------------ evaluation
def stored_digits():
    cfg = compose("mdeq", ["+experiment=digits", "seed=0"])
    return plain(cfg)


def test_evaluation_uses_the_checkpoints_config_and_refuses_a_changed_split():
    stored = stored_digits()
    cli = compose("mdeq", ["deq.eval_f_max_iter=3", "ckpt=x"], return_hydra_config=True)
    eff = effective_config(cli, stored, "digits")
    assert eff.data.name == "digits" and eff.model.channels == [16, 32] and eff.deq.eval_f_max_iter == 3
    with pytest.raises(ValueError, match="seed=1"):
        effective_config(compose("mdeq", ["seed=1", "ckpt=x"], return_hydra_config=True), stored, "digits")
    with pytest.raises(ValueError, match="trained as experiment 'digits'"):
        effective_config(compose("mdeq", ["+experiment=cifar_tiny", "ckpt=x"], return_hydra_config=True),
                         stored, "digits")


def test_evaluate_checkpoint_runs_without_grad_with_the_configured_threads(tmp_path, monkeypatch):
    sys.path.insert(0, str(TOY))
    from toy_model import build_model

    monkeypatch.setenv("ZOO_OUTPUTS", str(tmp_path))
    cfg = toy_cfg("device=cpu")
    model = build_model(cfg)
    OmegaConf.update(cfg, "train.cpu_threads", 1, force_add=True)
    save_checkpoint({"model": model.state_dict(), "config": plain(cfg), "project": "toy", "experiment": "tiny",
                     "step": 1}, tmp_path / "run" / "checkpoints" / "step_00000001.pt")
    seen = {}

    def measure(model, run):
        seen.update(grad=torch.is_grad_enabled(), threads=torch.get_num_threads(), training=model.training)
        return {"eval/x": 1.0, "rows": [1, 2]}

    previous = torch.get_num_threads()
    try:
        metrics = evaluate_checkpoint(toy_cfg("device=cpu", f"ckpt={tmp_path / 'run'}"), "toy", build_model, measure)
    finally:
        torch.set_num_threads(previous)
    assert seen == {"grad": False, "threads": 1, "training": False} and metrics == {"eval/x": 1.0}
    (results,) = (tmp_path / "toy" / "tiny").glob("*/results.json")
    record = json.loads(results.read_text())
    assert record["status"] == "evaluated" and record["extra"]["rows"] == [1, 2]


# ------------------------------------------------------------------------------ console, failures
def run_toy(*overrides, outputs, cwd):
    env = {"ZOO_OUTPUTS": str(outputs), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(TOY / "toy_train.py"), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_a_run_without_a_terminal_prints_plain_lines_a_summary_a_log_and_a_curve(tmp_path):
    proc = run_toy("+experiment=tiny", "device=cpu", "train.eval_every=null", outputs=tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = (tmp_path / "toy" / "tiny" / "latest").resolve()
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[toy/tiny] step ")]
    assert [l.split()[2] for l in lines] == [f"{s}/12" for s in range(2, 13, 2)]  # log.every=2
    assert all(" loss " in l and " lr " in l and "deq/abs" in l and " nfe " in l and "s/step" in l for l in lines)
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("[toy/tiny] completed: ") and "eval/accuracy" in summary
    assert f"run dir {run_dir}" in summary and "wall time" in summary
    assert summary in (run_dir / "train.log").read_text()
    evals = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/accuracy" in r]
    assert evals == [2, 4, 6, 8, 10, 12]  # eval_every null: about five evaluations, and the end
    assert (run_dir / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(300)
def test_a_run_that_fails_before_training_leaves_no_directory_and_latest_alone(tmp_path):
    experiment = tmp_path / "toy" / "tiny"
    experiment.mkdir(parents=True)
    (experiment / "earlier").mkdir()
    (experiment / "latest").symlink_to("earlier")
    proc = run_toy("+experiment=tiny", "device=cpu", "optim.lr=abc", outputs=tmp_path, cwd=tmp_path)
    assert proc.returncode != 0 and "optim.lr" in proc.stderr
    assert sorted(p.name for p in experiment.iterdir()) == ["earlier", "latest"]
    assert (experiment / "latest").resolve() == (experiment / "earlier").resolve()


# ------------------------------------------------------------------------------ compare_tables
def load_compare_tables():
    spec = importlib.util.spec_from_file_location("compare_tables_trust", REPO / "scripts" / "compare_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_tables_trust"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def result(path, top1, overrides, experiment="cifar_tiny", world_size=1, reported=True):
    path.mkdir(parents=True)
    record = {"project": "mdeq", "experiment": experiment, "status": "completed", "seed": 0,
              "metrics": {"test/top1": top1}, "overrides": overrides, "world_size": world_size,
              "reported": {"table": "table3", "row": "mdeq_tiny_torchdeq", "metrics": {"top1": "test/top1"}}
              if reported else None}
    (path / "results.json").write_text(json.dumps(record))


def test_compare_tables_counts_reproductions_only_and_says_how_many(tmp_path, capsys):
    ct = load_compare_tables()
    result(tmp_path / "a", 85.0, ["+experiment=cifar_tiny", "seed=0"])
    result(tmp_path / "b", 86.0, ["+experiment=cifar_tiny", "seed=1", "data.root=/data", "device=cuda"])
    result(tmp_path / "c", 86.5, ["+experiment=cifar_tiny", "train.batch_size=64"], world_size=2)  # torchrun x2
    result(tmp_path / "smoke", 11.0, ["+experiment=cifar_tiny", "train.steps=3", "train.batch_size=4"])
    result(tmp_path / "d1", 98.0, ["+experiment=digits"], experiment="digits", reported=False)
    result(tmp_path / "d2", 90.0, ["+experiment=digits", "deq=fp_pg", "train.epochs=2"], experiment="digits",
           reported=False)
    assert ct.main([str(tmp_path), "--table", "table3"]) == 0
    out = capsys.readouterr().out
    row = next(l for l in out.splitlines() if l.startswith("| MDEQ-Tiny (TorchDEQ)"))
    assert "86 (n=3)" in row and "3 runs" in row  # median of 85, 86, 86.5; the smoke run is not in it
    smoke = next(l for l in out.splitlines() if "train.steps=3" in l)
    assert "| 1 |" in smoke and "test/top1=11" in smoke
    digits = [l for l in out.splitlines() if l.startswith("| mdeq | digits")]
    assert len(digits) == 2 and any("deq=fp_pg train.epochs=2" in l for l in digits)
    assert ct.main([str(tmp_path), "--table", "table3", "--include-modified"]) == 0
    row = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| MDEQ-Tiny (TorchDEQ)"))
    assert "4 runs" in row


def test_compare_tables_into_head_exits_quietly(tmp_path):
    for i in range(1000):  # > 64 KiB of output: more than a pipe holds when `head` has left
        result(tmp_path / f"r{i}", 85.0, ["+experiment=cifar_tiny", f"train.steps={i + 1}"])
    proc = subprocess.run(f"{sys.executable} {REPO / 'scripts' / 'compare_tables.py'} {tmp_path} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().endswith(str(tmp_path)) and "Error" not in proc.stderr, proc.stderr

