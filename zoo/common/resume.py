"""Which checkpoint a training run continues from, and why the others were skipped.

- A run always continues its own directory's newest valid checkpoint (a requeued SLURM
  job re-runs in the same directory).
- ``resume=auto`` also looks at the earlier runs of the same experiment, newest first,
  and takes the first that is the same run: its resolved ``config.yaml`` equals this
  one's except for `zoo.common.config_keys.NON_RESULT_KEYS` (where it writes, logs,
  runs, reads data from). A run that completed is continued only when this config asks
  for more steps (``train.steps`` / ``train.epochs`` larger: an extension); then those
  two keys may differ. Every candidate skipped is one line saying why.
- ``resume=<checkpoint file or run dir>`` names one; a config that differs is an error.
- ``init_from=<checkpoint>`` is not a resume: it loads another run's model weights into a
  fresh run (new optimiser, schedule and step 0), e.g. DEQ-Flow's Things stage after Chairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import OmegaConf

from zoo.common.checkpoint import CKPT_PATTERN, latest_valid
from zoo.common.config_keys import NON_RESULT_KEYS, describe, differences
from zoo.common.results import read_results

LENGTH_KEYS = ("train.steps", "train.epochs")
AUTO = ("auto",)
OFF = (None, "", "none", "null")


@dataclass
class Candidate:
    """An earlier run that could be continued."""

    run_dir: Path
    checkpoint: Path
    step: int
    completed: bool
    config: dict[str, Any] | None


def candidate(run_dir: Path, checkpoint: Path | None = None) -> Candidate | None:
    """The run at `run_dir` with its newest valid checkpoint (or `checkpoint`); None without one."""
    checkpoint = checkpoint or latest_valid(run_dir / "checkpoints")
    if checkpoint is None:
        return None
    match = CKPT_PATTERN.match(checkpoint.name)
    config = None
    if (run_dir / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    completed = False
    if (run_dir / "results.json").is_file():
        try:
            completed = read_results(run_dir / "results.json").get("status") == "completed"
        except (OSError, ValueError):
            completed = False
    return Candidate(run_dir, checkpoint, int(match.group(1)) if match else -1, completed, config)


def why_not(ours: Mapping[str, Any], total_steps: int, cand: Candidate) -> str | None:
    """None when `cand` is this run (or its extension), else the reason it is not."""
    if cand.config is None:
        return "it has no config.yaml to compare"
    diff = differences(cand.config, ours, ignore=NON_RESULT_KEYS)
    other = {k: v for k, v in diff.items() if k not in LENGTH_KEYS}
    if other:
        return f"its config differs ({describe(other)})"
    if cand.completed:
        if total_steps > cand.step:
            return None  # an extension: more steps than it ran
        return (f"it completed at step {cand.step} and this run asks for {total_steps} steps "
                "(ask for more to extend it)")
    if diff:
        return f"it is unfinished with another length ({describe(diff)})"
    return None


def experiment_runs(out_dir: Path) -> list[Path]:
    """Earlier run directories of this run's experiment, newest first (multirun jobs included)."""
    experiment_dir = out_dir.parent
    if experiment_dir.name.startswith("multirun_"):
        experiment_dir = experiment_dir.parent
    folders = [p.parent for p in experiment_dir.glob("*/checkpoints")]
    folders += [p.parent for p in experiment_dir.glob("multirun_*/*/checkpoints")]
    folders = [p for p in folders if not p.is_symlink() and p.resolve() != out_dir.resolve()]  # not `latest`
    return sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)


def choose(choice: Any, ours: Mapping[str, Any], out_dir: Path, total_steps: int,
           say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from (see the module docstring), or None for a fresh start."""
    own = latest_valid(out_dir / "checkpoints")
    if own is not None:
        return own
    if choice in OFF:
        return None
    if choice in AUTO:
        for run_dir in experiment_runs(out_dir):
            cand = candidate(run_dir)
            if cand is None:
                continue
            reason = why_not(ours, total_steps, cand)
            if reason is None:
                return cand.checkpoint
            say(f"resume=auto: skipped {run_dir}: {reason}")
        return None
    path = Path(str(choice))
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        cand = candidate(run_dir)
        if cand is None:
            raise FileNotFoundError(f"resume={choice}: no valid checkpoint in {run_dir / 'checkpoints'}")
    elif path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        cand = candidate(run_dir, path)
    else:
        raise FileNotFoundError(f"resume={choice}: no such checkpoint file or run directory")
    reason = why_not(ours, total_steps, cand) if cand.config is not None else None
    if reason is not None:
        raise ValueError(f"resume={choice} is not this run: {reason}. To start from its weights "
                         f"with a fresh optimiser use init_from={choice}")
    return cand.checkpoint
