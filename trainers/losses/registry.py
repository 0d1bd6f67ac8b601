"""The loss registry: ``LOSSES`` (name -> function) and ``compute_loss`` with parameter checks.

Every loss is a plain function ``fn(batch, *, param=default, ...) -> Tensor[B]`` (per-example
losses; the trainer reduces). Its keyword-only parameters, with their defaults, are the loss's
parameters; ``register`` attaches a check per parameter so that ``compute_loss`` can refuse an
unknown name, an unknown parameter or a bad value with a ValueError that lists what is allowed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

LossFn = Callable[..., torch.Tensor]
Check = Callable[[Any], "str | None"]  # returns an error description, or None when the value is fine

LOSSES: dict[str, LossFn] = {}
"""name -> loss function ``fn(batch, **params) -> Tensor[B]``; see ``loss_spec`` for metadata."""


@dataclass(frozen=True)
class LossSpec:
    """What the registry knows about one loss."""

    name: str
    fn: LossFn
    kind: str  # pairwise | listwise | binary | any
    equation: str
    defaults: dict[str, Any]
    checks: dict[str, Check] = field(default_factory=dict)
    # batch keys beyond the kind's standard ones, as in the docstring; a trailing "?" marks an optional key
    extra_keys: tuple[str, ...] = ()

    def describe_params(self) -> str:
        if not self.defaults:
            return "(no parameters)"
        return ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())


_SPECS: dict[str, LossSpec] = {}


def register(name: str, *, kind: str, equation: str, checks: Mapping[str, Check] | None = None,
             extra_keys: tuple[str, ...] = ()):
    """Decorator: register ``fn`` under ``name``. Its keyword-only parameters are the loss's
    parameters; every one of them must have a check in ``checks``."""

    def wrap(fn: LossFn) -> LossFn:
        sig = inspect.signature(fn)
        defaults = {
            p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        missing = set(defaults) - set(checks or {})
        if missing:  # a programming error in this package, caught at import time
            raise TypeError(f"loss {name!r}: parameters without a check: {sorted(missing)}")
        if name in _SPECS:
            raise TypeError(f"loss {name!r} registered twice")
        _SPECS[name] = LossSpec(name, fn, kind, equation, defaults, dict(checks or {}), tuple(extra_keys))
        LOSSES[name] = fn
        return fn

    return wrap


def loss_spec(name: str) -> LossSpec:
    """The spec of ``name``, or a ValueError listing the registered names."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_SPECS))}") from None


def resolve_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` overridden by ``params``, each checked; ValueError on anything wrong."""
    spec = loss_spec(name)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"allowed: {spec.describe_params()}"
        )
    resolved = {**spec.defaults, **params}
    for key, value in params.items():
        problem = spec.checks[key](value)
        if problem:
            raise ValueError(f"loss {name!r}: parameter {key}={value!r} is invalid: {problem}")
    return resolved


def compute_loss(name: str, batch: Mapping[str, torch.Tensor], **params: Any) -> torch.Tensor:
    """Per-example losses ``Tensor[B]`` of loss ``name`` on ``batch`` (see DESIGN.md's loss table).

    ValueError for an unknown loss, unknown parameter or invalid value; MissingBatchKeyError
    (a KeyError) naming the key and the loss when the batch lacks a key the loss needs.
    """
    resolved = resolve_params(name, params)
    return _SPECS[name].fn(batch, **resolved)


# ---- parameter checks -------------------------------------------------------------------------


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive(v: Any) -> str | None:
    return None if _is_real(v) and v > 0 else "must be a finite number > 0"


def non_negative(v: Any) -> str | None:
    return None if _is_real(v) and v >= 0 else "must be a finite number >= 0"


def real(v: Any) -> str | None:
    return None if _is_real(v) else "must be a finite number"


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")

    def check(v: Any) -> str | None:
        ok = _is_real(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be a number in {left}{lo}, {hi}{right}"

    return check


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def optional_positive_int(v: Any) -> str | None:
    ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0)
    return None if ok else "must be None or an integer > 0"


def positive_int(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
    return None if ok else "must be an integer > 0"
