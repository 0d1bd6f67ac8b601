"""Shared numerics and batch access for the loss functions.

Everything here is elementwise or per-row; no function keeps state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

# Exponentials of log-ratios (forward-KL / alpha f-DPO, GPO exponential) overflow float32 once the
# argument passes ~88. Log-ratios of real sequences can reach 1e4, so the argument is clamped here:
# exp(50) ~ 5e21 keeps value and gradient finite in float32 and float64 alike. Beyond the clamp the
# gradient of that term is zero, a regime no sensible training run is in.
EXP_ARG_MAX = 50.0

# Fill for masked entries before logsumexp / sorting: finite (so no inf - inf = nan and no nan
# gradients), yet exp(NEG_FILL - anything real) == 0 in float32 and float64.
NEG_FILL = -1e30


class MissingBatchKeyError(KeyError):
    """A loss needs a batch key that the batch lacks (message names the key and the loss)."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0])


def need(batch: Mapping[str, torch.Tensor], loss: str, *keys: str) -> tuple[torch.Tensor, ...]:
    """The tensors under ``keys``, or MissingBatchKeyError naming the first missing key and ``loss``.

    bf16/fp16 tensors come back as float32: the losses take differences of log-probs in the tens
    and scale them (DPOP's lam=50), which half precision (8 bits of mantissa) would round away.
    These are per-example scalars, so the upcast costs nothing.
    """
    values = []
    for key in keys:
        if key not in batch:
            raise MissingBatchKeyError(
                f"loss {loss!r} needs batch key {key!r}; the batch has {sorted(batch)}"
            )
        value = batch[key]
        values.append(value.float() if value.dtype in (torch.bfloat16, torch.float16) else value)
    return tuple(values)


def logsig(z: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(z)), stable for any finite z (``ls`` in DESIGN.md)."""
    return F.logsigmoid(z)


def mean_logp(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean per-token log-prob ``logps / tokens``; an empty response counts as one token (no 0/0)."""
    return logps / tokens.to(logps.dtype).clamp(min=1)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, stable near 0 and near -inf (Maechler's two-branch rule).

    ``a`` is clamped to at most -eps(dtype) so a = 0 (probability one) gives a finite value
    (about log(eps)) and a finite gradient (about 1/eps) instead of -inf.
    """
    a = a.clamp(max=-torch.finfo(a.dtype).eps)
    near_zero = a > -0.6931471805599453  # -log 2
    # Both branches are evaluated; feed each only arguments it is stable on so that neither
    # produces inf/nan whose gradient torch.where would turn into nan.
    a_hi = torch.where(near_zero, a, torch.full_like(a, -1.0))
    a_lo = torch.where(near_zero, torch.full_like(a, -1.0), a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_hi)), torch.log1p(-torch.exp(a_lo)))


def clamped_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(min(x, EXP_ARG_MAX)): finite in float32 for any finite x (see EXP_ARG_MAX)."""
    return torch.exp(x.clamp(max=EXP_ARG_MAX))


def clamped_expm1(x: torch.Tensor) -> torch.Tensor:
    """expm1(min(x, EXP_ARG_MAX)), accurate near 0."""
    return torch.expm1(x.clamp(max=EXP_ARG_MAX))


def as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_fill(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` where ``mask`` else ``value``. Gradient to masked entries is exactly 0, even if they
    hold garbage (inf/nan), because torch.where selects rather than multiplies."""
    return torch.where(mask, x, torch.full_like(x, value))
