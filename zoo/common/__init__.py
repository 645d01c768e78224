"""zoo.common: the runtime the six projects share (and nothing else).

`zoo_main` (Hydra entry + config search path), `Run` (seed, device, DDP, run directory,
logging, checkpoints, the `fit` loop, results.json), optimiser / schedule / clipping
builders, `require_files` for dataset errors, `deq_metrics` for DEQ diagnostics,
`evaluate_checkpoint` (the body of every evaluate.py). Resume rules: resume.py; the test-
time sweep: sweep.py; checkpoint converters' helpers: convert.py; CIFAR-10: cifar.py.
See run.py's docstring for a whole train.py.
"""
from zoo.common.checkpoint import CheckpointManager, latest_valid, load_checkpoint, save_checkpoint
from zoo.common.config_check import check_types
from zoo.common.data import MissingDataError, require_files
from zoo.common.distributed import ResumableSampler, all_reduce_mean
from zoo.common.hydra_main import compose, zoo_main
from zoo.common.logger import deq_metrics, peak_memory_mb, read_metrics
from zoo.common.optim import ClockedSchedule, build_optimizer, build_scheduler, clip_gradients
from zoo.common.results import read_results
from zoo.common.evaluation import evaluate_checkpoint
from zoo.common.run import FitOutput, Run, seed_everything

__all__ = [
    "CheckpointManager", "ClockedSchedule", "FitOutput", "MissingDataError", "ResumableSampler", "Run",
    "all_reduce_mean",
    "build_optimizer", "build_scheduler", "check_types", "clip_gradients", "compose", "deq_metrics",
    "evaluate_checkpoint",
    "latest_valid", "load_checkpoint", "peak_memory_mb", "read_metrics", "read_results", "require_files",
    "save_checkpoint", "seed_everything", "zoo_main",
]
