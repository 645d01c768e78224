"""The Hydra entry point of every zoo project, and the config search path.

`zoo_main(project)` replaces `@hydra.main`: it points Hydra (1.3, ``version_base="1.3"``)
at ``configs/<project>/config.yaml`` by absolute path and puts the ``configs/`` root on
Hydra's search path, so a project config can use the shared groups that live there
(``deq: fp_pg`` from ``configs/deq/``, ``hydra/launcher: slurm`` from
``configs/hydra/launcher/``) and the shared ``run_defaults.yaml``. Both paths are computed
from this file, so ``python -m zoo.<project>.train`` works from any working directory and
under an editable install, with no packaging step: the search path is a Hydra
SearchPathPlugin that this module registers with Hydra's plugin registry itself (a plugin
shipped in ``hydra_plugins/`` would need the namespace package installed, and breaks when
the repo is used without ``pip install -e``).

A project's ``train.py``::

    from zoo.common.hydra_main import zoo_main

    @zoo_main("mdeq")
    def main(cfg):
        ...

    if __name__ == "__main__":
        main()

`compose(project, overrides)` builds the same config without running anything (tests,
notebooks).
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import hydra
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = REPO_ROOT / "configs"


class ZooSearchPathPlugin(SearchPathPlugin):
    """Appends the repository's ``configs/`` root to Hydra's config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="deq-zoo", path=f"file://{CONFIGS_DIR}")


def register_search_path() -> None:
    """Registers `ZooSearchPathPlugin` with Hydra (idempotent)."""
    Plugins.instance().register(ZooSearchPathPlugin)


def project_config_dir(project: str) -> Path:
    """``configs/<project>``; raises if the project has no config folder."""
    path = CONFIGS_DIR / project
    if not (path / "config.yaml").is_file():
        known = sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "config.yaml").is_file())
        raise FileNotFoundError(
            f"no config for project {project!r}: expected {path / 'config.yaml'}; "
            f"projects with a config: {known}"
        )
    return path


def check_deq_overrides(argv: Sequence[str]) -> None:
    """A misspelt ``deq.<option>=`` on the command line stops with core's "did you mean"
    message (Hydra's own would advise adding ``+``, which then fails inside the run)."""
    from core.config import DEQConfig

    names = DEQConfig.option_names()
    for arg in argv:
        key, eq, _ = arg.partition("=")
        if not eq or not key.startswith("deq."):
            continue
        option = key.split(".")[1]
        if option not in names:
            try:
                DEQConfig().update(**{option: None})
            except TypeError as err:
                raise SystemExit(f"{key}: {err}") from None


def _discard_failed_job() -> None:
    """Removes the Hydra run directory of a job that failed before training started."""
    from hydra.core.hydra_config import HydraConfig

    from zoo.common.run import discard_unstarted_run

    if HydraConfig.initialized():
        discard_unstarted_run(Path(HydraConfig.get().runtime.output_dir))


def _send_other_ranks_elsewhere() -> None:
    """Under torchrun every rank runs Hydra; only rank 0 may create the run directory.

    Ranks > 0 get a throw-away Hydra directory (their ``Run`` uses rank 0's directory,
    received over the process group), so ``outputs/`` holds one run per job.
    """
    if int(os.environ.get("RANK", "0")) == 0 or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    scratch = tempfile.mkdtemp(prefix=f"zoo_rank{os.environ['RANK']}_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    sys.argv = [a for a in sys.argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def zoo_main(project: str, config_name: str = "config", config_dir: str | Path | None = None
             ) -> Callable[[Callable[[DictConfig], object]], Callable[[], object]]:
    """Decorator: ``@zoo_main("mdeq")`` is ``@hydra.main`` on ``configs/mdeq/config.yaml``.

    ``config_dir`` replaces ``configs/<project>`` (the tests' toy project keeps its
    configs beside it); the ``configs/`` root is on the search path either way.
    """
    config_dir = Path(config_dir).resolve() if config_dir else project_config_dir(project)
    register_search_path()

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], object]:
        @functools.wraps(task)
        def job(cfg: DictConfig) -> object:
            try:
                return task(cfg)
            except BaseException:
                _discard_failed_job()
                raise

        main = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(job)

        @functools.wraps(task)
        def entry() -> object:
            check_deq_overrides(sys.argv[1:])
            _send_other_ranks_elsewhere()
            return main()

        return entry

    return decorate


def compose(project: str, overrides: Sequence[str] = (), config_name: str = "config",
            return_hydra_config: bool = False, config_dir: str | Path | None = None) -> DictConfig:
    """The config ``python -m zoo.<project>.train <overrides>`` would run with, without running.

    With ``return_hydra_config=True`` the ``hydra`` node is kept, which `Run` needs to
    name the experiment; outside a Hydra run, `Run` reads ``cfg.hydra`` when present.
    """
    from hydra import compose as hydra_compose, initialize_config_dir

    register_search_path()
    config_dir = Path(config_dir).resolve() if config_dir else project_config_dir(project)
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
