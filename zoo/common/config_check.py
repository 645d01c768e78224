"""Type checks of composed configs, so a wrongly typed override names the option.

Hydra merges a YAML config without types: ``seed=abc`` or ``train.steps=1.5`` would only
fail deep inside a run, if at all. `check_types` validates a config node against a
dataclass schema (OmegaConf's structured-config conversion) and raises a ``ValueError``
that names the option, its value and the expected type. `check_runtime_options` does it
for the shared runtime options (``configs/run_defaults.yaml``) and for the ``deq`` node
(through ``core.config.DEQConfig``). Projects call `check_types` on their own sections.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from zoo.common.config_keys import flatten


@dataclass
class LogOptions:
    every: int = 10
    progress: bool = True


@dataclass
class WandbOptions:
    mode: str = "offline"
    project: str = "deq-zoo"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerOptions:
    wandb: WandbOptions = field(default_factory=WandbOptions)


@dataclass
class CheckpointOptions:
    every: int = 0
    keep: int = 3


@dataclass
class RuntimeOptions:
    """The shared runtime options and their types (defaults in configs/run_defaults.yaml)."""

    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    deterministic: bool = False
    resume: Optional[str] = None
    ckpt: Optional[str] = None
    init_from: Optional[str] = None
    compile: str = "none"
    compile_backend: str = "inductor"
    compile_options: Dict[str, Any] = field(default_factory=dict)
    log: LogOptions = field(default_factory=LogOptions)
    logger: LoggerOptions = field(default_factory=LoggerOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)


@dataclass
class TrainOptions:
    """The ``train:`` options every project shares (a project may add its own)."""

    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    eval_every: Optional[int] = None
    cpu_threads: Optional[int] = None


@dataclass
class OptimOptions:
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None


@dataclass
class SchedOptions:
    warmup_steps: Optional[float] = None   # a step count, or a fraction of the run (< 1)
    eta_min: Optional[float] = None


CHOICES = {"amp": ("none", "bf16", "fp16"), "compile": ("none", "default", "reduce-overhead", "max-autotune"),
           "compile_backend": ("inductor", "aot_eager", "eager"), "logger.wandb.mode": ("offline", "online", "disabled")}


def _declared(node: DictConfig, schema: type) -> DictConfig:
    """`node` less the keys `schema` (and its nested dataclasses) does not declare."""
    declared = {f.name: f for f in fields(schema)}
    subset = OmegaConf.masked_copy(node, [k for k in node.keys() if k in declared])
    for name, f in declared.items():
        inner = f.default_factory() if f.default_factory is not MISSING else None
        if is_dataclass(inner) and isinstance(subset.get(name), DictConfig):
            subset[name] = _declared(subset[name], type(inner))
    return subset


def check_types(cfg: DictConfig, schema: type, key: str | None = None) -> None:
    """Raises ValueError naming the first option of ``cfg`` (or ``cfg.<key>``) whose value
    does not fit the dataclass ``schema``; options the schema does not declare are left alone.
    """
    assert is_dataclass(schema)
    node = OmegaConf.select(cfg, key) if key else cfg
    if node is None:
        return
    subset = _declared(node, schema)
    try:
        OmegaConf.merge(OmegaConf.structured(schema), subset)
    except OmegaConfBaseException as err:
        full_key = getattr(err, "full_key", None) or "?"
        if key:
            full_key = f"{key}.{full_key}"
        value = OmegaConf.select(cfg, full_key, default="?", throw_on_missing=False) if full_key != "?" else "?"
        reason = str(err).splitlines()[0]
        raise ValueError(f"option {full_key}={value!r} has the wrong type: {reason}") from None


def compile_settings(cfg: DictConfig) -> tuple[str, str, dict[str, Any]]:
    """(``compile`` mode, ``compile_backend``, ``compile_options``) with their defaults; the
    options' nested keys joined as inductor spells them ({cpp: {use_decompose_tanh: true}}
    -> "cpp.use_decompose_tanh")."""
    mode = str(cfg.get("compile", "none") or "none")
    backend = str(cfg.get("compile_backend", "inductor") or "inductor")
    options = cfg.get("compile_options") or {}
    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options, resolve=True)
    return mode, backend, flatten(options)


def check_compile_options(cfg: DictConfig) -> None:
    """``compile_options`` and a mode other than ``default`` are inductor's, and exclusive
    (torch.compile takes a mode or options, not both)."""
    mode, backend, options = compile_settings(cfg)
    if mode in ("none", "default") and not options:
        return
    if backend != "inductor":
        what = "compile_options" if options else f"compile={mode}"
        raise ValueError(f"{what} is for compile_backend=inductor, not {backend}")
    if options and mode != "default":
        raise ValueError(f"compile_options go with compile=default, not compile={mode}: torch.compile "
                         "takes a mode or options, not both (a mode is a preset of options)")


def check_runtime_options(cfg: DictConfig) -> None:
    """Types and choices of the shared runtime options, and the ``deq`` node when present."""
    check_types(cfg, RuntimeOptions)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and str(value) not in allowed:
            raise ValueError(f"option {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    check_compile_options(cfg)
    every = OmegaConf.select(cfg, "log.every", default=None)
    if every is not None and every < 0:
        raise ValueError(f"option log.every={every} must be >= 0")
    deq = cfg.get("deq") if isinstance(cfg, DictConfig) else None
    if deq is not None:
        from core.config import BOOL_OPTIONS, DEQConfig

        parsed = DEQConfig.from_any(deq)  # raises ValueError naming the option (deq.<name>) and what it accepts
        # the node keeps what the options mean: deq.ift=no is False for code that reads cfg.deq.ift
        for name in BOOL_OPTIONS:
            if name in deq and not isinstance(deq[name], bool) and deq[name] is not None:
                with open_dict(deq):
                    deq[name] = getattr(parsed, name)
    check_types(cfg, TrainOptions, "train")
    check_types(cfg, OptimOptions, "optim")
    check_types(cfg, SchedOptions, "sched")
    for key in ("train.steps", "train.epochs", "train.batch_size", "train.eval_batch_size",
                "train.eval_every", "train.cpu_threads", "sched.warmup_steps", "optim.lr",
                "optim.weight_decay"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value < 0:
            raise ValueError(f"option {key}={value!r} must be >= 0")
    for key in ("train.batch_size", "train.eval_batch_size", "optim.lr"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not value > 0:
            raise ValueError(f"option {key}={value!r} must be > 0")
