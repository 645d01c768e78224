"""Which config keys can change a run's result: one list for resume, evaluation and tables.

`NON_RESULT_KEYS` are the options that cannot change what a run computes (where it is
written, how it logs, which device or how many threads it uses, where the data lives,
what an evaluation measures). Two runs whose resolved configs differ only there are the
same run: `resume=auto` may continue one with the other, and `scripts/compare_tables.py`
groups them. `TEST_TIME_KEYS` are what an evaluation may change on the command line
besides them: the test-time solver options and the evaluation batch size. Patterns are
dotted keys with ``*`` wildcards (`fnmatch`).
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

NON_RESULT_KEYS = (
    "resume", "ckpt", "ckpt_format", "log.*", "logger.*", "checkpoint.*", "device", "compile",
    "compile_backend", "compile_options", "compile_options.*", "train.cpu_threads", "data.num_workers", "data.root", "eval.*", "hydra.*",
)
TEST_TIME_KEYS = NON_RESULT_KEYS + (
    "deq.eval_*", "deq.f_solver", "deq.f_max_iter", "deq.f_tol", "deq.f_stop_mode",
    "deq.f_solver_kwargs", "deq.f_solver_kwargs.*", "train.eval_batch_size", "amp", "deterministic",
)


def command_line_overrides(cfg: Any = None) -> list[str] | None:
    """The overrides given on the command line (Hydra's task overrides), or None outside Hydra.

    Outside a Hydra run, a config composed with ``return_hydra_config=True`` still says.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if HydraConfig.initialized():
        return [str(o) for o in HydraConfig.get().overrides.task]
    found = OmegaConf.select(cfg, "hydra.overrides.task", default=None) if cfg is not None else None
    return None if found is None else [str(o) for o in found]


def override_key(override: str) -> str:
    """``+deq.grad=5`` -> ``deq.grad``; ``deq=fp_pg`` -> ``deq`` (a config group)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def matches(key: str, patterns: Iterable[str]) -> bool:
    """True when the dotted `key` (or one of its parents) matches one of `patterns`."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are leaves."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
        return out
    return {prefix: tree}


def differences(a: Mapping[str, Any], b: Mapping[str, Any],
                ignore: Iterable[str] = NON_RESULT_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{key: (value in a, value in b)}`` for the leaves that differ, less the `ignore` patterns.

    A key missing on one side reads as ``<missing>``.
    """
    ignore = tuple(ignore)
    fa, fb = flatten(a), flatten(b)
    out = {}
    for key in sorted(set(fa) | set(fb)):
        if matches(key, ignore):
            continue
        va, vb = fa.get(key, "<missing>"), fb.get(key, "<missing>")
        if va != vb:
            out[key] = (va, vb)
    return out


def describe(diff: Mapping[str, tuple[Any, Any]], limit: int = 4) -> str:
    """``seed: 0 -> 1, deq.f_max_iter: 6 -> 8`` (the first `limit` differences)."""
    items = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:limit]]
    more = len(diff) - limit
    return ", ".join(items) + (f" (+{more} more)" if more > 0 else "")
