"""DEQ weight normalisation: the shared machinery and the apply/reset/remove/register API.

A DEQ calls its function f tens of times per forward pass with the same weights, so the
normalised ("effective") weight is computed once per `reset_norm` (once per DEQ forward)
and stored as a plain attribute under the weight's usual name (`module.weight`), which the
module's own forward then reads. The trainable tensors move to new names (TorchDEQ's:
`weight_v` and `weight_g` for weight norm; `weight_orig`, `weight_g` and the power-iteration
buffers `weight_u`, `weight_v` for spectral norm), so TorchDEQ checkpoints load unchanged.

All norms share one formula (TorchDEQ paper, eqs. 15-16), row-wise over output rows:

    W_eff = W * min(t, f),   f = g / N(W)   or   f = target_norm / N(W) with norm_no_scale,

where t = norm_clip_value applies only with norm_clip. Subclasses define N (`_norm_of`) and
how g is initialised (`_initial_scale`).

Beyond TorchDEQ, the effective weight never goes stale silently: a forward pre-hook
recomputes it when the module was moved to another device or dtype, when its parameters
were changed in place since the last computation (an optimiser step, `load_state_dict`,
DDP's initial broadcast), or after `copy.deepcopy` / unpickling. Modules are matched by
`isinstance`, so subclasses of Linear and of the convolutions are normalised too.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from core.config import DEQConfig, _deq_items

__all__ = ["DEQNorm", "apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module"]

# The DEQ options this module reads, and TorchDEQ's keyword names for the same options
# (`WeightNorm.apply(..., learn_scale=..., clip=...)`), accepted as aliases.
NORM_OPTIONS = ("norm_type", "norm_no_scale", "norm_clip", "norm_clip_value", "norm_target_norm",
                "sn_n_power_iters")
_TORCHDEQ_KEYWORDS = {
    "learn_scale": ("norm_no_scale", lambda value: not value),
    "target_norm": ("norm_target_norm", lambda value: value),
    "clip": ("norm_clip", lambda value: value),
    "clip_value": ("norm_clip_value", lambda value: value),
    "n_power_iterations": ("sn_n_power_iters", lambda value: value),
}

_ATTRIBUTE = "_deq_norm"  # where a normalised module keeps its DEQNorm


class DEQNorm:
    """One normalisation attached to one module: computes, caches and removes W_eff.

    Subclasses set `_target_modules` (module class -> (names, dims)), the names of the
    trainable tensors (`_source_suffix`), and implement `_norm_of` and `_initial_scale`.
    `dims[i]` is the output dimension of weight `names[i]` (1 for transposed
    convolutions, whose weight is (in, out, ...)).
    """

    # The layers both norms decorate: (weight name, output dim); transposed convolutions
    # store their weight as (in, out, ...). register_norm_module adds more per norm.
    _target_modules: Dict[type, Tuple[Union[str, Sequence[str]], Union[int, Sequence[int]]]] = {
        nn.Linear: ("weight", 0),
        nn.Conv1d: ("weight", 0),
        nn.Conv2d: ("weight", 0),
        nn.Conv3d: ("weight", 0),
        nn.ConvTranspose1d: ("weight", 1),
        nn.ConvTranspose2d: ("weight", 1),
        nn.ConvTranspose3d: ("weight", 1),
    }
    _source_suffix = "_v"

    def __init__(self, names: Sequence[str], dims: Sequence[int], config: DEQConfig):
        self.names = list(names)
        self.dims = list(dims)
        self.learn_scale = not config.norm_no_scale
        self.target_norm = float(config.norm_target_norm)
        self.clip = bool(config.norm_clip)
        self.clip_value = float(config.norm_clip_value)
        self._stale = False
        self._versions: List[int] = []
        self._cache: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ subclass API
    def _norm_of(self, module: nn.Module, name: str, dim: int, weight: torch.Tensor,
                 first: bool, update: bool) -> torch.Tensor:
        """N(W), broadcastable against `weight` (one value per output row, or a scalar).

        `first`: the first computation after apply_norm; `update`: whether an iterative
        estimate (spectral norm's power iteration) may advance its state.
        """
        raise NotImplementedError

    def _initial_scale(self, module: nn.Module, name: str, dim: int, weight: torch.Tensor) -> torch.Tensor:
        """The initial g, with the shape of N(W) per output row."""
        raise NotImplementedError

    def _attach_extra(self, module: nn.Module, name: str, dim: int, weight: torch.Tensor) -> None:
        """Register any buffers the norm needs (spectral norm's power-iteration vectors)."""

    def _detach_extra(self, module: nn.Module, name: str) -> None:
        """Delete what `_attach_extra` registered."""

    # ------------------------------------------------------------------- the formula
    def source(self, module: nn.Module, name: str) -> nn.Parameter:
        """The trainable, un-normalised weight W."""
        return module._parameters[name + self._source_suffix]

    def compute_weight(self, module: nn.Module, name: str, dim: int, first: bool = False,
                       update: bool = True) -> torch.Tensor:
        """W_eff = W * min(t, g / N(W)) (or target_norm / N(W) without scale)."""
        weight = self.source(module, name)
        norm = self._norm_of(module, name, dim, weight, first, update)
        numerator = module._parameters[name + "_g"] if self.learn_scale else self.target_norm
        factor = numerator / norm
        if self.clip:
            factor = torch.clamp(factor, max=self.clip_value)
        return weight * factor

    def reset(self, module: nn.Module, first: bool = False) -> None:
        """Recompute every effective weight of `module` (once per DEQ forward)."""
        for name, dim in zip(self.names, self.dims):
            self._cache[name] = module.__dict__[name] = self.compute_weight(module, name, dim, first)
        self._versions = self._source_versions(module)
        self._stale = False

    def _source_versions(self, module: nn.Module) -> List[int]:
        versions = []
        for name in self.names:
            versions.append(self.source(module, name)._version)
            if self.learn_scale:
                versions.append(module._parameters[name + "_g"]._version)
        return versions

    def _refresh_if_stale(self, module: nn.Module, inputs: Any) -> None:
        """Forward pre-hook: recompute W_eff if it no longer matches the parameters."""
        if torch.compiler.is_compiling():
            return  # a compiled f relies on the per-forward reset_norm
        weight = self.source(module, self.names[0])
        cached = module.__dict__.get(self.names[0])
        if (self._stale or cached is None or cached.device != weight.device or cached.dtype != weight.dtype
                or self._versions != self._source_versions(module)):
            self.reset(module)

    # ------------------------------------------------------------- attach / detach
    @classmethod
    def apply(cls, module: nn.Module, config: DEQConfig,
              names: Optional[Union[str, Sequence[str]]] = None,
              dims: Optional[Union[int, Sequence[int]]] = None) -> "DEQNorm":
        """Attach this norm to `module`: move its weights, add g, compute W_eff once."""
        if names is None or dims is None:
            names, dims = cls.target_for(type(module))
        names = [names] if isinstance(names, str) else list(names)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if len(names) != len(dims):
            raise ValueError(f"register_norm_module: {len(names)} names but {len(dims)} dims")
        if _ATTRIBUTE in module.__dict__:
            raise ValueError(f"{type(module).__name__} is already normalised; call remove_norm first")
        fn = cls(names, dims, config)
        # Insert the norm before the effective weights in __dict__, so that deepcopy meets
        # it first and can stand in for the (non-leaf) cached weights: see __deepcopy__.
        module.__dict__[_ATTRIBUTE] = fn
        for name, dim in zip(names, dims):
            weight = module._parameters.get(name)
            if not isinstance(weight, nn.Parameter):
                raise ValueError(f"{type(module).__name__}.{name} is not a parameter and cannot be normalised")
            if fn.learn_scale:
                with torch.no_grad():
                    scale = fn._initial_scale(module, name, dim, weight)
                module.register_parameter(name + "_g", nn.Parameter(scale))
            del module._parameters[name]
            module.register_parameter(name + cls._source_suffix, weight)
            fn._attach_extra(module, name, dim, weight)
        module.register_forward_pre_hook(fn._refresh_if_stale)
        fn.reset(module, first=True)
        return fn

    def remove(self, module: nn.Module) -> None:
        """Bake the current W_eff into an ordinary parameter and detach the norm."""
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():  # no power-iteration step: the weight the module uses now
                weight = self.compute_weight(module, name, dim, update=False)
            module.__dict__.pop(name, None)
            del module._parameters[name + self._source_suffix]
            if self.learn_scale:
                del module._parameters[name + "_g"]
            self._detach_extra(module, name)
            module.register_parameter(name, nn.Parameter(weight.detach().clone()))
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is self:
                del module._forward_pre_hooks[key]
        self._cache = {}
        del module.__dict__[_ATTRIBUTE]

    @classmethod
    def target_for(cls, module_class: type) -> Optional[Tuple[Any, Any]]:
        """(names, dims) registered for `module_class` or its nearest registered base."""
        for klass in module_class.__mro__:
            if klass in cls._target_modules:
                return cls._target_modules[klass]
        return None

    # ----------------------------------------------------------- copy and pickling
    def __deepcopy__(self, memo: Dict[int, Any]) -> "DEQNorm":
        """Copy the options; the copy recomputes W_eff from its own parameters on first use.

        The cached W_eff tensors are graph outputs, which `Tensor.__deepcopy__` refuses. The
        norm sits before them in its module's __dict__ (see `apply`), so deepcopy reaches it
        first, and a detached snapshot is put in the memo to stand in for each of them.
        """
        new = copy.copy(self)
        memo[id(self)] = new
        for cached in self._cache.values():
            if not cached.is_leaf:
                memo[id(cached)] = cached.detach().clone()
        new.names, new.dims = list(self.names), list(self.dims)
        new._versions, new._cache, new._stale = [], {}, True
        return new

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle the options only; the unpickled module recomputes W_eff on first use."""
        state = dict(self.__dict__)
        state.update(_stale=True, _versions=[], _cache={})
        return state


# ---------------------------------------------------------------------------- registry
_norm_classes: Dict[str, type] = {}


def register_norm(norm_type: str, norm_class: type) -> None:
    """Make `norm_class` (a DEQNorm subclass) available as `apply_norm(..., norm_type)`."""
    if not (isinstance(norm_class, type) and issubclass(norm_class, DEQNorm)):
        raise TypeError(f"register_norm expects a DEQNorm subclass, got {norm_class!r}")
    norm_class._target_modules = dict(norm_class._target_modules)  # own copy, inherited entries kept
    _norm_classes[norm_type] = norm_class


def register_norm_module(module_class: type, norm_type: str, names: Union[str, Sequence[str]] = "weight",
                         dims: Union[int, Sequence[int]] = 0) -> None:
    """Normalise `names` of every `module_class` instance (subclasses too) under `norm_type`.

    `dims` gives, per name, the dimension that indexes output rows.
    """
    _norm_class(norm_type)._target_modules[module_class] = (names, dims)


def _norm_class(norm_type: str) -> type:
    if norm_type not in _norm_classes:
        raise ValueError(f"norm_type={norm_type!r} is not registered; choose one of "
                         f"{', '.join(['none', *_norm_classes])}")
    return _norm_classes[norm_type]


# --------------------------------------------------------------------------------- API
def _norm_config(norm_type: str, args: Any, norm_kwargs: Dict[str, Any]) -> DEQConfig:
    """Resolve the norm options: keywords first, then every option `args` sets (args win)."""
    options = {"norm_type": norm_type}
    for key, value in norm_kwargs.items():
        if key in _TORCHDEQ_KEYWORDS:
            key, convert = _TORCHDEQ_KEYWORDS[key]
            value = convert(value)
        elif key not in NORM_OPTIONS:
            raise TypeError(f"apply_norm got an unknown keyword {key!r}; norm options are "
                            f"{', '.join(NORM_OPTIONS)} (or TorchDEQ's {', '.join(_TORCHDEQ_KEYWORDS)})")
        options[key] = value
    if args is not None:
        options.update({k: v for k, v in _deq_items(args, DEQConfig.option_names()).items() if k in NORM_OPTIONS})
    if options["norm_type"] != "none":
        _norm_class(options["norm_type"])  # a registered name, or a ValueError naming them
    config = DEQConfig()
    config.update(**{k: v for k, v in options.items() if k != "norm_type"})
    config.validate()
    config.norm_type = options["norm_type"]  # may be a user-registered name
    return config


def _as_list(value: Optional[Union[str, Iterable[str]]]) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def apply_norm(model: nn.Module, norm_type: str = "weight_norm",
               prefix_filter_out: Optional[Union[str, Sequence[str]]] = None,
               filter_out: Optional[Union[str, Sequence[str]]] = None,
               args: Any = None, **norm_kwargs: Any) -> None:
    """Normalise the weights of every registered module of `model` (TorchDEQ's apply_norm).

    Modules match by isinstance (subclasses of Linear, Conv*d, ConvTranspose*d and of any
    class given to `register_norm_module`); modules already normalised are left as they are.

    Args:
        model: the module tree (usually the DEQ function f).
        norm_type: 'weight_norm', 'spectral_norm', 'none' (nothing) or a registered name.
        prefix_filter_out: skip modules whose qualified name starts with one of these.
        filter_out: skip modules whose qualified name contains one of these.
        args: any config (DEQConfig, argparse.Namespace, dict, OmegaConf node); the options
            it sets (norm_type, norm_no_scale, norm_clip, norm_clip_value,
            norm_target_norm, sn_n_power_iters) win over the keywords.
        **norm_kwargs: the same options as keywords (TorchDEQ's `learn_scale`,
            `target_norm`, `clip`, `clip_value`, `n_power_iterations` are accepted too).
    """
    config = _norm_config(norm_type, args, norm_kwargs)
    if config.norm_type == "none":
        return
    norm_class = _norm_class(config.norm_type)
    prefixes, substrings = _as_list(prefix_filter_out), _as_list(filter_out)
    targets = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in prefixes) or any(s in name for s in substrings):
            continue
        target = norm_class.target_for(type(module))
        if target is not None and _ATTRIBUTE not in module.__dict__:
            targets.append((module, target))
    for module, (names, dims) in targets:
        norm_class.apply(module, config, names, dims)


def reset_norm(model: nn.Module) -> None:
    """Recompute every effective weight in `model`; call once per DEQ forward, before the solve."""
    for module in model.modules():
        fn = module.__dict__.get(_ATTRIBUTE)
        if fn is not None:
            fn.reset(module)


def remove_norm(model: nn.Module) -> None:
    """Replace every normalised weight by its current effective value, as a plain parameter."""
    for module in list(model.modules()):
        fn = module.__dict__.get(_ATTRIBUTE)
        if fn is not None:
            fn.remove(module)
