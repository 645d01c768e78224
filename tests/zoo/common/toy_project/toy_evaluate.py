"""Evaluate a toy checkpoint through zoo.common, as a project's evaluate.py does."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toy_model import build_model, evaluate, load_data  # noqa: E402

from zoo.common import evaluate_checkpoint, zoo_main  # noqa: E402


@zoo_main("toy", config_dir=Path(__file__).parent / "configs")
def main(cfg):
    # cfg.ckpt: a checkpoint file or a run directory (its newest valid checkpoint)
    evaluate_checkpoint(cfg, "toy", build_model, lambda model, run: evaluate(model, load_data(cfg.data), run.device))


if __name__ == "__main__":
    main()
