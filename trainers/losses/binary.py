"""Binary-feedback losses (survey 3.6: KTO eq. 32-34, DRO eq. 37-39; 3.10.2: NPO).

Batch keys: ``logps`` ``[B]`` (policy, summed over response tokens), ``ref_logps`` ``[B]``,
``tokens`` ``[B]``, ``label`` ``[B]`` bool (True = desirable), ``kl`` (KTO only: scalar or
``[B]``, the reference-point estimate before clamping and before beta, eq. 33).
``r = logps - ref_logps``. Every function returns ``Tensor[B]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._util import as_bool, logsig, need
from .registry import non_negative, positive, register

Batch = Mapping[str, torch.Tensor]


@register("kto", kind="binary", equation="32-34",
          checks={"beta": positive, "lambda_d": non_negative, "lambda_u": non_negative})
def kto(batch: Batch, *, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0) -> torch.Tensor:
    """KTO, eq. 32-34. ``z0 = beta*max(0, kl)`` (eq. 33; no gradient flows into the reference
    point, as in the KTO paper); label true: ``lambda_d*(1 - sigmoid(beta*r - z0))``; false:
    ``lambda_u*(1 - sigmoid(z0 - beta*r))``. lambda_d / lambda_u: weights of desirable /
    undesirable examples (eq. 34's lambda_D, lambda_U). Build ``kl`` with
    ``kto_kl_from_mismatched``."""
    logps, ref, label, kl = need(batch, "kto", "logps", "ref_logps", "label", "kl")
    reward = beta * (logps - ref)
    z0 = beta * torch.as_tensor(kl, dtype=reward.dtype, device=reward.device).detach().clamp(min=0)
    desirable = lambda_d * torch.sigmoid(z0 - reward)  # 1 - sigmoid(x) == sigmoid(-x), no cancellation
    undesirable = lambda_u * torch.sigmoid(reward - z0)
    return torch.where(as_bool(label), desirable, undesirable)


def kto_mismatched_indices(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[B]`` indices j(i) = (i + 1) mod B: pair prompt i with the response of example j(i) != i.

    Shifting by one gives every example a different partner for any B >= 2, odd sizes included
    (reversing the batch, as some trainers do, pairs the middle example of an odd batch with
    itself). ValueError for B < 2: one example has no mismatched partner.
    """
    if batch_size < 2:
        raise ValueError(f"the KTO KL estimate needs at least 2 examples per batch, got {batch_size}")
    return torch.roll(torch.arange(batch_size, device=device), shifts=-1)


def kto_kl_from_mismatched(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """KTO's reference point estimate (eq. 33, before clamping and before beta), detached.

    mismatched_logps, ref_mismatched_logps: ``[M]`` policy / reference log-probs (summed over
    response tokens) of responses y_j scored under other prompts x_i, i != j (build the pairs
    with ``kto_mismatched_indices``); valid: optional ``[M]`` bool, False for pairs to ignore
    (e.g. empty responses). Returns the 0-dim mean of ``logps - ref_logps`` over valid pairs;
    0 when there is none (no NaN). Put it in the batch as ``kl``; with several processes,
    average it across them first.
    """
    ratio = (mismatched_logps - ref_mismatched_logps).detach()
    if valid is None:
        valid = torch.ones_like(ratio, dtype=torch.bool)
    valid = as_bool(valid) & torch.isfinite(ratio)
    total = torch.where(valid, ratio, torch.zeros_like(ratio)).sum()
    return total / valid.sum().clamp(min=1).to(ratio.dtype)


@register("npo", kind="binary", equation="3.10.2", checks={"beta": positive})
def npo(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """NPO (section 3.10.2): on undesirable responses only, ``-(2/beta)*ls(-beta*r)`` (the DPO
    loss with the chosen term removed). ValueError if any row has ``label`` True."""
    logps, ref, label = need(batch, "npo", "logps", "ref_logps", "label")
    if bool(as_bool(label).any()):
        raise ValueError("loss 'npo' takes only undesirable responses (label False); the batch has label-True rows")
    return -(2.0 / beta) * logsig(-beta * (logps - ref))


@register("dro", kind="binary", equation="37-39", checks={"beta": positive}, extra_keys=("value", "reward?"))
def dro(batch: Batch, *, beta: float = 1.0) -> torch.Tensor:
    """DRO-V, eq. 37: ``0.5*(reward - V(x) - beta*r)**2``.

    Extra batch keys: ``value`` ``[B]``, the value head's V_phi(x) (with gradient: this loss
    trains policy and value head together, eq. 38-39); ``reward`` ``[B]`` the single-trajectory
    feedback r(x, y) (optional: absent, it is +1 for ``label`` True and -1 for False, the
    survey's binary encoding). The policy gradient of this squared loss is beta times eq. 38's;
    the DRO paper's 1/beta rescaling of the policy gradient is left to the optimizer/learning rate.
    """
    logps, ref, value = need(batch, "dro", "logps", "ref_logps", "value")
    if "reward" in batch:
        reward = batch["reward"].to(logps.dtype)
    else:
        (label,) = need(batch, "dro", "label")
        reward = torch.where(as_bool(label), 1.0, -1.0).to(logps.dtype)
    return 0.5 * (reward - value.to(logps.dtype) - beta * (logps - ref)) ** 2
