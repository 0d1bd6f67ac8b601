"""SFT, the mean per-token negative log-likelihood (survey 3.1), on any kind of batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._util import mean_logp, need
from .listwise import _nll_best, mean_listwise_logps
from .registry import register

Batch = Mapping[str, torch.Tensor]


@register("sft", kind="any", equation="3.1", checks={})
def sft(batch: Batch) -> torch.Tensor:
    """``-a``: mean per-token NLL, ``Tensor[B]``.

    Pairwise batch (has ``chosen_logps``): of the chosen response (``chosen_tokens``).
    Listwise batch (``logps`` is ``[B,K]``): of the best valid response by ``scores``.
    Otherwise (sft / binary kinds): of the response, ``logps`` / ``tokens`` ``[B]``; a binary
    ``label`` is ignored (filter undesirable rows before SFT if that is wanted).
    """
    if "chosen_logps" in batch:
        c, t = need(batch, "sft", "chosen_logps", "chosen_tokens")
        return -mean_logp(c, t)
    (logps,) = need(batch, "sft", "logps")
    if logps.dim() == 2:
        p, scores, mask = mean_listwise_logps(batch, "sft")
        return _nll_best(p, scores, mask)
    (tokens,) = need(batch, "sft", "tokens")
    return -mean_logp(logps, tokens)
