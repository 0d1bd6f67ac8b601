"""Losses that need per-token tensors beyond sequence summaries: TDPO (eq. 25-28) and CRINGE
(eq. 29-30), with helpers that build those tensors from model outputs.

Shapes: B examples, T response positions (after the usual shift), V vocabulary, k top-k width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ._util import as_bool, logsig, mean_logp, need
from .pairwise import implicit_rewards
from .registry import non_negative, one_of, positive, positive_int, real, register

Batch = Mapping[str, torch.Tensor]


def sequential_kl(ref_vocab_logps: torch.Tensor, policy_vocab_logps: torch.Tensor,
                  token_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 27 with the forward direction TDPO uses: ``D_SeqKL(x, y; pi_ref || pi_theta)`` ``[B]``.

    ``sum_t mask_t * sum_v pi_ref(v|t) * (log pi_ref(v|t) - log pi_theta(v|t))``.
    ref_vocab_logps, policy_vocab_logps: ``[B,T,V]`` log-softmax over the vocabulary at each
    response position (teacher-forced on y); token_mask: ``[B,T]`` bool, False at prompt/padding.
    Reference entries of -inf (probability 0) contribute 0; policy log-probs must be finite.
    """
    mask = as_bool(token_mask).unsqueeze(-1)
    # Clean inputs before any arithmetic: padding positions may hold anything (even nan) without
    # reaching value or gradient, and a zero-probability (-inf) reference entry contributes 0.
    use = mask & torch.isfinite(ref_vocab_logps)
    ref = torch.where(use, ref_vocab_logps, torch.zeros_like(ref_vocab_logps))
    pol = torch.where(mask, policy_vocab_logps, torch.zeros_like(policy_vocab_logps))
    p_ref = torch.where(use, ref.exp(), torch.zeros_like(ref))
    return (p_ref * (ref - pol)).sum(dim=(-1, -2))


def _seq_kls(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if "chosen_seq_kl" in batch or "rejected_seq_kl" in batch:
        return need(batch, "tdpo", "chosen_seq_kl", "rejected_seq_kl")
    kls = []
    for side in ("chosen", "rejected"):
        pol, ref, mask = need(batch, "tdpo", f"{side}_vocab_logps", f"ref_{side}_vocab_logps", f"{side}_token_mask")
        kls.append(sequential_kl(ref, pol, mask))
    return kls[0], kls[1]


@register("tdpo", kind="pairwise", equation="25-28",
          checks={"beta": positive, "alpha": non_negative, "variant": one_of("tdpo1", "tdpo2")},
          extra_keys=("chosen_seq_kl", "rejected_seq_kl", "chosen_vocab_logps", "ref_chosen_vocab_logps",
                      "rejected_vocab_logps", "ref_rejected_vocab_logps", "chosen_token_mask", "rejected_token_mask"))
def tdpo(batch: Batch, *, beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2") -> torch.Tensor:
    """TDPO, eq. 28: ``-ls(u - delta)`` with ``u = beta*D`` and
    ``delta = beta*(SeqKL_l - SeqKL_w)``, SeqKL = D_SeqKL(x, y; pi_ref || pi_theta) (eq. 27).

    variant tdpo1: exactly eq. 28. tdpo2 (default): ``-ls(beta*(D - alpha*(SeqKL_l - sg(SeqKL_w))))``,
    the TDPO paper's second form: alpha weighs the KL gap and the chosen side's SeqKL is
    stop-gradient (the survey's "stop the propagation of the gradient of y_w"). alpha is unused
    by tdpo1.

    Batch: the pairwise summary keys, plus EITHER ``chosen_seq_kl``, ``rejected_seq_kl`` ``[B]``
    (from ``sequential_kl``, with gradient) OR the raw tensors ``chosen_vocab_logps``,
    ``ref_chosen_vocab_logps``, ``rejected_vocab_logps``, ``ref_rejected_vocab_logps``
    ``[B,T,V]`` (log-softmax over the vocabulary) and ``chosen_token_mask``,
    ``rejected_token_mask`` ``[B,T]`` bool.
    """
    r_w, r_l = implicit_rewards(batch, "tdpo")
    kl_w, kl_l = _seq_kls(batch)
    kl_w, kl_l = kl_w.to(r_w.dtype), kl_l.to(r_w.dtype)
    if variant == "tdpo1":
        logits = (r_w - r_l) - (kl_l - kl_w)
    else:
        logits = (r_w - r_l) - alpha * (kl_l - kl_w.detach())
    return -logsig(beta * logits)


# ---- CRINGE ------------------------------------------------------------------------------------


def cringe_topk_excluding(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From model logits ``[B,T,V]`` and the negative response's tokens ``[B,T]`` (long), return
    ``(topk_logits [B,T,k], token_logits [B,T])``: the k highest logits at each position with the
    negative token itself excluded (eq. 29's candidates), and the negative token's logit."""
    ids = token_ids.long().unsqueeze(-1)
    token_logits = logits.gather(-1, ids).squeeze(-1)
    others = logits.scatter(-1, ids, float("-inf"))
    return others.topk(k, dim=-1).values, token_logits


def cringe_sample_index(topk_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B,T]`` long: one sample per position from softmax over the top-k logits (eq. 29's s*),
    for the paper's sampled variant (pass as ``[rejected_]sampled_index``)."""
    probs = torch.softmax(topk_logits.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def cringe_token_contrast(topk_logits: torch.Tensor, token_logits: torch.Tensor, token_mask: torch.Tensor,
                          k: int, sampled_index: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 29's bracket per negative token, ``[B]``: ``mean_t -log(exp(s*_t) / (exp(s*_t) + exp(s_t[y_t-])))``
    = ``mean_t softplus(s_t[y_t-] - s*_t)`` over masked-in positions (0 for a row without any).
    Eq. 29 sums both of its terms over tokens; DESIGN.md makes the positive term a mean per token
    (``-a_w``), so this term is a mean as well and alpha keeps eq. 29's ratio between them.

    With ``sampled_index`` ``[B,T]``, s* is that top-k entry (the paper's sampling). Without, the
    term is its expectation under the softmax over the top-k (weights detached): the same expected
    value and expected gradient as sampling, without sampling noise.
    """
    if topk_logits.shape[-1] < k:
        raise ValueError(f"loss 'cringe' with k={k} needs top-k logits of width >= {k}, got {topk_logits.shape[-1]}")
    mask = as_bool(token_mask)
    topk = torch.where(mask.unsqueeze(-1), topk_logits[..., :k], torch.zeros_like(topk_logits[..., :k]))
    neg = torch.where(mask, token_logits, torch.zeros_like(token_logits)).unsqueeze(-1)
    per_candidate = F.softplus(neg - topk)  # [B,T,k]
    if sampled_index is not None:
        per_token = per_candidate.gather(-1, sampled_index.long().clamp(0, k - 1).unsqueeze(-1)).squeeze(-1)
    else:
        weights = torch.softmax(topk.detach(), dim=-1)
        per_token = (weights * per_candidate).sum(-1)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    # mean over the negative tokens: the same normalisation as the positive term -a_w (DESIGN.md's
    # mean per-token NLL), so alpha weighs the two terms as eq. 29 does (both summed there). A sum
    # here against a mean there made the negative term ~T times heavier than alpha says.
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1).to(per_token.dtype)


@register("cringe", kind="binary or pairwise", equation="29-30",
          checks={"alpha": non_negative, "k": positive_int, "b": real, "tau": positive},
          extra_keys=("[rejected_]token_logits", "[rejected_]topk_logits", "[rejected_]token_mask",
                      "[rejected_]sampled_index?"))
def cringe(batch: Batch, *, alpha: float = 1.0, k: int = 5, b: float = 0.0, tau: float = 1.0) -> torch.Tensor:
    """CRINGE: binary eq. 29, or pairwise gated eq. 30 when the batch has ``chosen_logps``.

    Binary batch: ``logps``, ``tokens``, ``label`` ``[B]``, and for the negatives ``token_logits``
    ``[B,T]`` (logit of each negative token y_t-), ``topk_logits`` ``[B,T,>=k]`` (top-k logits
    excluding y_t-, see ``cringe_topk_excluding``), ``token_mask`` ``[B,T]`` bool, optional
    ``sampled_index`` ``[B,T]``. Loss: label True ``-a`` (mean per-token NLL); label False
    ``alpha * contrast`` (``cringe_token_contrast``: mean over the negative tokens, like ``-a``).

    Pairwise batch: ``chosen_logps``, ``rejected_logps``, ``chosen_tokens`` and the same token
    tensors for the rejected response, prefixed ``rejected_`` (``rejected_token_logits``,
    ``rejected_topk_logits``, ``rejected_token_mask``, optional ``rejected_sampled_index``).
    Loss: ``g * (-a_w + alpha*contrast_l)``, gate ``g = sigmoid((b - (chosen_logps - rejected_logps))/tau)``
    (eq. 30; the gate keeps its gradient, as written there).

    alpha: weight of the negative term; k: top-k width; b: gate margin; tau: gate temperature.
    b = 0, tau = 1 are our defaults (DESIGN.md and the survey give none).
    """
    if "chosen_logps" in batch:
        c, r, t_w = need(batch, "cringe", "chosen_logps", "rejected_logps", "chosen_tokens")
        topk, neg, mask = need(batch, "cringe", "rejected_topk_logits", "rejected_token_logits", "rejected_token_mask")
        contrast = cringe_token_contrast(topk, neg, mask, k, batch.get("rejected_sampled_index")).to(c.dtype)
        gate = torch.sigmoid((b - (c - r)) / tau)
        return gate * (-mean_logp(c, t_w) + alpha * contrast)
    logps, tokens, label = need(batch, "cringe", "logps", "tokens", "label")
    topk, neg, mask = need(batch, "cringe", "topk_logits", "token_logits", "token_mask")
    contrast = cringe_token_contrast(topk, neg, mask, k, batch.get("sampled_index")).to(logps.dtype)
    return torch.where(as_bool(label), -mean_logp(logps, tokens), alpha * contrast)
