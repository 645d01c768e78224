"""DEQConfig: every DEQ option in one dataclass.

The same class is (1) the config object `get_deq` and `apply_norm` read, with TorchDEQ's
`.get(key, default)` / `.update(**kw)`; (2) the Hydra structured config behind the
presets in `configs/deq/`; (3) the source of TorchDEQ's command-line flags
(`add_deq_args`). Defaults are TorchDEQ 0.1.0's.

`DEQConfig.from_any(args, **kw)` takes whatever a program has (a DEQConfig, an
argparse.Namespace, a dict, an OmegaConf node, any object with attributes). A whole
program's namespace may carry other options, which are ignored, but a key that looks like
a misspelt DEQ option (`stop_mode`, `f_max_iters`) is an error naming the right one, and
an unknown keyword argument is a TypeError. Values are checked by `validate()` with a
message that names the option and what it accepts.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

STOP_MODES = ("abs", "rel")
CORES = ("sliced", "indexing")
NORM_TYPES = ("none", "weight_norm", "spectral_norm")

# Option names used by the original DEQ / MDEQ repositories and TorchDEQ's own solver
# arguments: a program that still carries them most likely meant the DEQ option.
_ALIASES = {
    "stop_mode": "f_stop_mode",
    "f_thres": "f_max_iter",
    "b_thres": "b_max_iter",
    "f_eps": "f_tol",
    "b_eps": "b_tol",
    "pg_steps": "grad",
    "wnorm": "norm_type",
}


@dataclass
class DEQConfig:
    """All DEQ options, with TorchDEQ 0.1.0's names and defaults (plus ours, last)."""

    core: str = "sliced"
    f_solver: str = "fixed_point_iter"
    b_solver: str = "fixed_point_iter"
    no_stat: Optional[bool] = None
    f_max_iter: int = 40
    b_max_iter: int = 40
    f_tol: float = 1e-3
    b_tol: float = 1e-6
    f_stop_mode: str = "abs"
    b_stop_mode: str = "abs"
    eval_factor: float = 1.0
    eval_f_max_iter: int = 0
    ift: bool = False
    hook_ift: bool = False
    grad: Any = 1  # int, or one int per sampled state
    tau: float = 1.0
    sup_gap: int = -1
    sup_loc: Optional[List[int]] = None
    n_states: int = 1
    indexing: Optional[List[int]] = None
    gamma: float = 0.8
    norm_type: str = "weight_norm"
    norm_no_scale: bool = False
    norm_clip: bool = False
    norm_clip_value: float = 1.0
    norm_target_norm: float = 1.0
    sn_n_power_iters: int = 1
    jac_loss_weight: float = 0.0
    jac_loss_freq: float = 0.0
    jac_incremental: int = 0
    sradius_mode: bool = False
    # Ours: extra options for the forward / backward solver (e.g. {"m": 5, "sync_free": True}).
    f_solver_kwargs: Dict[str, Any] = field(default_factory=dict)
    b_solver_kwargs: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def option_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_any(cls, args: Any = None, **kwargs: Any) -> "DEQConfig":
        """Build a validated config from `args` (any config type) updated by `kwargs`."""
        config = cls()
        if args is not None:
            config.update(**_deq_items(args, cls.option_names()))
        unknown = [k for k in kwargs if k not in cls.option_names()]
        if unknown:
            raise TypeError(_unknown_message(unknown[0], cls.option_names(), "keyword argument"))
        config.update(**kwargs)
        config.validate()
        return config

    # ------------------------------------------------------------- TorchDEQ's wrapper
    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def update(self, **kwargs: Any) -> "DEQConfig":
        names = self.option_names()
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(_unknown_message(key, names, "option"))
            value = _plain(value)
            if key in BOOL_OPTIONS:
                value = parse_bool(f"deq.{key}", value, optional=(key == "no_stat"))
            setattr(self, key, value)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived values
    def grad_list(self) -> List[int]:
        """`grad` as a list of phantom-gradient step counts, one per sampled state."""
        return list(self.grad) if isinstance(self.grad, (list, tuple)) else [int(self.grad)]

    def eval_max_iter(self) -> int:
        """The solver budget in evaluation mode (TorchDEQ's rule)."""
        if self.eval_f_max_iter > 0:
            return int(self.eval_f_max_iter)
        return int(self.f_max_iter * self.eval_factor)

    def stat_off(self) -> bool:
        """TorchDEQ's `no_stat=None`: statistics off only for simple_fixed_point_iter."""
        if self.no_stat is None:
            return self.f_solver == "simple_fixed_point_iter"
        return bool(self.no_stat)

    # -------------------------------------------------------------------- validation
    def validate(self) -> "DEQConfig":
        """Raise ValueError naming the first bad option and what it accepts."""
        _choice("core", self.core, CORES)
        _choice("f_stop_mode", self.f_stop_mode, STOP_MODES)
        _choice("b_stop_mode", self.b_stop_mode, STOP_MODES)
        _choice("norm_type", str(self.norm_type), NORM_TYPES)
        for name in ("f_solver", "b_solver"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"deq.{name} must be a solver name, got {getattr(self, name)!r}")
        for name in ("f_max_iter", "b_max_iter", "eval_f_max_iter", "jac_incremental"):
            _int(name, getattr(self, name), minimum=0)
        _int("n_states", self.n_states, minimum=1)
        _int("sn_n_power_iters", self.sn_n_power_iters, minimum=1)
        _int("sup_gap", self.sup_gap, minimum=-1)
        for name in ("f_tol", "b_tol", "eval_factor", "norm_clip_value", "norm_target_norm"):
            _positive(name, getattr(self, name))
        if not 0.0 < float(self.tau) <= 2.0:
            raise ValueError(f"deq.tau is a damping factor in (0, 2], got {self.tau!r}")
        if not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"deq.gamma is a correction weight in (0, 1], got {self.gamma!r}")
        if float(self.jac_loss_weight) < 0:
            raise ValueError(f"deq.jac_loss_weight must be >= 0, got {self.jac_loss_weight!r}")
        if not 0.0 <= float(self.jac_loss_freq) <= 1.0:
            raise ValueError(f"deq.jac_loss_freq is a probability in [0, 1], got {self.jac_loss_freq!r}")
        self.grad = _int_or_list("grad", self.grad, minimum=0)
        self.indexing = _optional_list("indexing", self.indexing, minimum=0)
        self.sup_loc = _optional_list("sup_loc", self.sup_loc, minimum=0)
        for name in ("f_solver_kwargs", "b_solver_kwargs"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"deq.{name} must be a mapping of solver options, got {getattr(self, name)!r}")
        return self


# ---------------------------------------------------------------------- argparse flags
def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add TorchDEQ's DEQ flags, unchanged, to an argparse parser."""
    solvers = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"]
    add = parser.add_argument
    add("--f_solver", default="fixed_point_iter", type=str, help="forward solver")
    add("--b_solver", default="fixed_point_iter", type=str, choices=solvers, help="backward solver")
    add("--no_stat", type=bool, help="skip solver statistics")
    add("--f_max_iter", default=40, type=int, help="forward solver budget")
    add("--b_max_iter", default=40, type=int, help="backward solver budget")
    add("--f_tol", default=1e-3, type=float, help="forward tolerance")
    add("--b_tol", default=1e-6, type=float, help="backward tolerance")
    add("--f_stop_mode", default="abs", choices=STOP_MODES, help="forward stop criterion")
    add("--b_stop_mode", default="abs", choices=STOP_MODES, help="backward stop criterion")
    add("--eval_factor", default=1.0, type=float, help="eval budget = f_max_iter * factor")
    add("--eval_f_max_iter", default=0, type=int, help="eval budget (overrides eval_factor)")
    add("--norm_type", default="weight_norm", choices=NORM_TYPES, help="normalisation")
    add("--norm_no_scale", action="store_true", help="remove the learnable scale")
    add("--norm_clip", action="store_true", help="clip the normalisation factor")
    add("--norm_clip_value", default=1.0, type=float, help="clip value")
    add("--norm_target_norm", default=1.0, type=float, help="target norm without scale")
    add("--sn_n_power_iters", default=1, type=int, help="spectral-norm power iterations")
    add("--core", default="sliced", choices=CORES, help="DEQ computational graph")
    add("--ift", action="store_true", help="implicit differentiation")
    add("--hook_ift", action="store_true", help="implicit differentiation through a hook")
    add("--n_states", default=1, type=int, help="number of sampled states")
    add("--indexing", default=[], type=int, nargs="+", help="steps at which states are sampled")
    add("--gamma", default=0.8, type=float, help="fixed-point correction weight")
    add("--grad", default=[1], type=int, nargs="+", help="phantom-gradient steps")
    add("--tau", default=1.0, type=float, help="phantom-gradient damping")
    add("--sup_gap", default=-1, type=int, help="supervision gap")
    add("--sup_loc", default=[], type=int, nargs="+", help="supervision locations")
    add("--jac_loss_weight", default=0.0, type=float, help="Jacobian regularisation weight")
    add("--jac_loss_freq", default=0.0, type=float, help="Jacobian regularisation probability")
    add("--jac_incremental", default=0, type=int, help="Jacobian regularisation warm-up steps")
    add("--sradius_mode", action="store_true", help="estimate the spectral radius at eval")
    return parser


# ------------------------------------------------------------------------------ helpers
def _deq_items(args: Any, names: List[str]) -> Dict[str, Any]:
    """The DEQ options found in `args`; a near-miss of an option name raises."""
    if isinstance(args, DEQConfig):
        return args.to_dict()
    items = _as_mapping(args)
    found = {}
    for key, value in items.items():
        if key in names:
            if value is not None or key in ("no_stat", "sup_loc", "indexing"):
                found[key] = value
            continue
        target = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, names, n=1, cutoff=0.88)), None)
        if target is not None:
            raise ValueError(f"config key {key!r} is not a DEQ option: did you mean {target!r}?")
    # argparse gives [] for an unset list flag; TorchDEQ treats it as "not given".
    for key in ("indexing", "sup_loc"):
        if key in found and not found[key]:
            found[key] = None
    return found


def _as_mapping(args: Any) -> Dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(args, DictConfig):
            return OmegaConf.to_container(args, resolve=True)
    except ImportError:  # omegaconf is a dependency; keep core importable without it
        pass
    if isinstance(args, Mapping):
        return dict(args)
    if hasattr(args, "__dict__"):
        return dict(vars(args))
    raise TypeError(f"cannot read DEQ options from a {type(args).__name__}")


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain Python (lists, dicts)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    return value


def _unknown_message(key: str, names: List[str], what: str) -> str:
    close = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, names, n=1, cutoff=0.6)), None)
    hint = f"; did you mean {close!r}?" if close else f"; known options: {', '.join(names)}"
    return f"unknown DEQ {what} {key!r}{hint}"


BOOL_OPTIONS = ("no_stat", "ift", "hook_ift", "norm_no_scale", "norm_clip", "sradius_mode")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def parse_bool(name: str, value: Any, optional: bool = False) -> Optional[bool]:
    """A boolean option from its usual spellings (true/false, yes/no, on/off, 1/0).

    ``bool("false")`` is True: a string from a command line or a YAML file must be read
    by its words. Any other value is a ValueError naming the option.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    spellings = "/".join(f"{t}|{f}" for t, f in zip(TRUE_WORDS, FALSE_WORDS))
    raise ValueError(f"{name}={value!r} is not a boolean; use one of {spellings}"
                     + (" or null" if optional else ""))


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"deq.{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"deq.{name} must be an integer >= {minimum}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"deq.{name} must be a positive number, got {value!r}")


def _int_or_list(name: str, value: Any, minimum: int) -> Any:
    if _is_int(value):
        if value < minimum:
            raise ValueError(f"deq.{name} must be >= {minimum}, got {value!r}")
        return value
    values = _optional_list(name, value, minimum)
    if not values:
        raise ValueError(f"deq.{name} must be an integer or a non-empty list of integers, got {value!r}")
    return values[0] if len(values) == 1 else values


def _optional_list(name: str, value: Any, minimum: int) -> Optional[List[int]]:
    if value is None:
        return None
    if _is_int(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= minimum for v in value):
        raise ValueError(f"deq.{name} must be a list of integers >= {minimum}, got {value!r}")
    return list(value)
