"""Evaluate a toy checkpoint through zoo.common, as a project's evaluate.py does."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toy_model import build_model, evaluate, load_data  # noqa: E402

from zoo.common import Run, zoo_main  # noqa: E402


@zoo_main("toy", config_dir=Path(__file__).parent / "configs")
def main(cfg):
    with Run(cfg, project="toy", mode="eval") as run:
        model = build_model(cfg).to(run.device)
        run.load_model(model)  # cfg.ckpt: a checkpoint file or a run directory
        model.eval()
        metrics = evaluate(model, load_data(cfg.data), run.device)
        run.write_results(metrics, checkpoint=str(cfg.ckpt))


if __name__ == "__main__":
    main()
