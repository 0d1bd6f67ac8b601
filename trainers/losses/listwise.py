"""Listwise losses (survey 3.9: LiPO eq. 49 and its other objectives, RRHF eq. 50, PRO eq. 51-52)
and the reward-model Bradley-Terry loss (eq. 1).

Batch keys: ``logps`` ``[B,K]`` (policy, summed over response tokens), ``ref_logps`` ``[B,K]``,
``tokens`` ``[B,K]``, ``scores`` ``[B,K]`` (higher is better; equal = tie), ``mask`` ``[B,K]``
bool (False = padding). Padding counts nowhere: masked entries are replaced by neutral values
before any arithmetic, so garbage (even inf/nan) in them changes neither loss nor gradient.
Pairs with equal scores count in no pairwise sum. Orders "by score" break ties by column index.
Every function returns ``Tensor[B]``; a row with no valid response has loss 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ._util import NEG_FILL, as_bool, logsig, masked_fill, mean_logp, need
from .registry import boolean, non_negative, positive, real, register

Batch = Mapping[str, torch.Tensor]


def _mask(batch: Batch, loss: str) -> torch.Tensor:
    (mask,) = need(batch, loss, "mask")
    return as_bool(mask)


def _clean(x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return masked_fill(x, mask, fill)


def listwise_scores(batch: Batch, loss: str, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, scores, mask)``: LiPO's ``s = beta*(logps - ref_logps)`` ``[B,K]``, cleaned scores, mask."""
    mask = _mask(batch, loss)
    logps, ref, scores = need(batch, loss, "logps", "ref_logps", "scores")
    s = beta * (_clean(logps, mask) - _clean(ref, mask))
    return s, _clean(scores.to(s.dtype), mask), mask


def mean_listwise_logps(batch: Batch, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, scores, mask)``: length-normalized policy log-probs ``p = logps/tokens`` ``[B,K]``."""
    mask = _mask(batch, loss)
    logps, tokens, scores = need(batch, loss, "logps", "tokens", "scores")
    p = mean_logp(_clean(logps, mask), _clean(tokens.to(logps.dtype), mask, 1.0))
    return p, _clean(scores.to(p.dtype), mask), mask


def order_by_score(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Column indices ``[B,K]`` sorting each row by score descending, ties by index, padding last."""
    key = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def best_index(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` column of the best valid response (highest score, lowest index among ties)."""
    return order_by_score(scores, mask)[:, 0]


def strict_pairs(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B,K,K]`` bool, True where both are valid and ``scores[i] > scores[j]`` (ties excluded)."""
    both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return both & (scores.unsqueeze(-1) > scores.unsqueeze(-2))


def _pair_diff(x: torch.Tensor) -> torch.Tensor:
    """``[B,K,K]`` with ``x[i] - x[j]`` at ``[b, i, j]``."""
    return x.unsqueeze(-1) - x.unsqueeze(-2)


def _sum_pairs(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    return torch.where(pairs, values, torch.zeros_like(values)).sum(dim=(-1, -2))


def _nll_best(p: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-a_best`` ``[B]``: mean per-token NLL of the best response; 0 for an all-padding row."""
    best = best_index(scores, mask)
    nll = -p.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask.any(-1), nll, torch.zeros_like(nll))


@register("rrhf", kind="listwise", equation="50", checks={})
def rrhf(batch: Batch) -> torch.Tensor:
    """RRHF, eq. 50: ``sum_{score_i < score_j} relu(p_i - p_j) - a_best``, ``p = logps/tokens``
    (the SFT term as mean per-token NLL of the best response, DESIGN.md)."""
    p, scores, mask = mean_listwise_logps(batch, "rrhf")
    # pairs[b, i, j]: score_i > score_j; the worse response j must not out-score i: relu(p_j - p_i).
    pairs = strict_pairs(scores, mask)
    ranking = _sum_pairs(F.relu(-_pair_diff(p)), pairs)
    return ranking + _nll_best(p, scores, mask)


def _sorted(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, order)


@register("pro", kind="listwise", equation="51-52", checks={"alpha": non_negative, "score_temperature": boolean})
def pro(batch: Batch, *, alpha: float = 1.0, score_temperature: bool = False) -> torch.Tensor:
    """PRO, eq. 51 (and eq. 52 with ``score_temperature``):
    ``-a_best + alpha*sum_{k<K} -log softmax(p_k..p_K)[k]``, responses ordered by score
    descending, ``p = logps/tokens``.

    score_temperature: eq. 52's per-pair temperatures from the human/RM scores, as the PRO paper
    (the survey writes r_theta; the paper uses the reward model's scores): logits of step k are
    ``p_i * (score_k - score_i)`` for i > k and ``p_k * max_{i>k}(score_k - score_i)`` for the
    positive, i.e. ``p/T`` with ``T_i^k = 1/(score_k - score_i)``, ``T_k^k = min_{i>k} T_i^k``.
    """
    p, scores, mask = mean_listwise_logps(batch, "pro")
    order = order_by_score(scores, mask)
    ps, ss, ms = _sorted(p, order), _sorted(scores, order), _sorted(mask, order)
    K = p.shape[-1]
    idx = torch.arange(K, device=p.device)
    later = idx.unsqueeze(0) > idx.unsqueeze(1)  # [k, i]: i > k
    candidates = (idx.unsqueeze(0) >= idx.unsqueeze(1)) & ms.unsqueeze(-2)  # [B, k, i]
    if score_temperature:
        gaps = ss.unsqueeze(-1) - ss.unsqueeze(-2)  # [B, k, i]: score_k - score_i >= 0
        valid_later = later & ms.unsqueeze(-2)
        max_gap = torch.where(valid_later, gaps, torch.zeros_like(gaps)).amax(-1)  # [B, k]
        logits = ps.unsqueeze(-2) * gaps
        diag = idx.unsqueeze(0) == idx.unsqueeze(1)
        logits = torch.where(diag, (ps * max_gap).unsqueeze(-1).expand_as(logits), logits)
    else:
        logits = ps.unsqueeze(-2).expand(-1, K, -1)
    logits = torch.where(candidates, logits, torch.full_like(logits, NEG_FILL))
    positive_logit = logits.diagonal(dim1=-2, dim2=-1)  # [B, k]
    step_nll = torch.logsumexp(logits, dim=-1) - positive_logit
    # step k counts when the response at k is valid and some valid response comes after it.
    n_valid = ms.sum(-1, keepdim=True)
    steps = idx.unsqueeze(0) < (n_valid - 1)
    align = torch.where(steps, step_nll, torch.zeros_like(step_nll)).sum(-1)
    return _nll_best(p, scores, mask) + alpha * align


def _ranks(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based rank ``[B,K]`` of each valid entry of s (descending, ties by index); no gradient."""
    order = order_by_score(s.detach(), mask)
    return torch.argsort(order, dim=-1).to(s.dtype) + 1


@register("lipo", kind="listwise", equation="49", checks={"beta": positive})
def lipo(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """LiPO-lambda, eq. 49: ``sum_{score_i > score_j} L_ij * log(1 + exp(-(s_i - s_j)))``,
    ``s = beta*(logps - ref_logps)``, ``L_ij = |G_i - G_j| * |1/log2(1+t_i) - 1/log2(1+t_j)|``,
    ``G = 2**score - 1``, ``t`` = 1-based rank of s among the valid responses (descending, ties
    by index). The Lambda weights carry no gradient (they are ranks)."""
    s, scores, mask = listwise_scores(batch, "lipo", beta)
    gain = torch.pow(2.0, scores) - 1
    discount = 1.0 / torch.log2(1 + _ranks(s, mask))
    weight = _pair_diff(gain).abs() * _pair_diff(discount).abs()
    return _sum_pairs(weight * F.softplus(-_pair_diff(s)), strict_pairs(scores, mask))


@register("list_mle", kind="listwise", equation="3.9.1", checks={"beta": positive})
def list_mle(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """ListMLE (Plackett-Luce; LiPO's list_mle, section 3.9.1):
    ``-sum_k (s_(k) - logsumexp(s_(k..K)))``, order by score descending, ties by index,
    ``s = beta*(logps - ref_logps)``."""
    s, scores, mask = listwise_scores(batch, "list_mle", beta)
    order = order_by_score(scores, mask)
    ss, ms = _sorted(s, order), _sorted(mask, order)
    filled = torch.where(ms, ss, torch.full_like(ss, NEG_FILL))
    suffix_lse = torch.logcumsumexp(filled.flip(-1), dim=-1).flip(-1)
    terms = torch.where(ms, ss - suffix_lse, torch.zeros_like(ss))
    return -terms.sum(-1)


@register("pair_logistic", kind="listwise", equation="3.9.1", checks={"beta": positive})
def pair_logistic(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """LiPO's pair_logistic (RankNet): ``sum_{score_i > score_j} log(1 + exp(-(s_i - s_j)))``."""
    s, scores, mask = listwise_scores(batch, "pair_logistic", beta)
    return _sum_pairs(F.softplus(-_pair_diff(s)), strict_pairs(scores, mask))


@register("pair_hinge", kind="listwise", equation="3.9.1", checks={"beta": positive})
def pair_hinge(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """LiPO's pair_hinge: ``sum_{score_i > score_j} relu(1 - (s_i - s_j))``."""
    s, scores, mask = listwise_scores(batch, "pair_hinge", beta)
    return _sum_pairs(F.relu(1 - _pair_diff(s)), strict_pairs(scores, mask))


@register("point_mse", kind="listwise", equation="3.9.1", checks={"beta": positive})
def point_mse(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """LiPO's point_mse: ``sum_i (s_i - score_i)**2`` over valid responses (scores as targets,
    LiPO normalizes them to [0, 1])."""
    s, scores, mask = listwise_scores(batch, "point_mse", beta)
    return torch.where(mask, (s - scores) ** 2, torch.zeros_like(s)).sum(-1)


@register("point_sigmoid", kind="listwise", equation="3.9.1", checks={"beta": positive})
def point_sigmoid(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """LiPO's point_sigmoid: ``-sum_i [score_i*ls(s_i) + (1-score_i)*ls(-s_i)]`` (binary
    cross-entropy against scores in [0, 1])."""
    s, scores, mask = listwise_scores(batch, "point_sigmoid", beta)
    bce = -(scores * logsig(s) + (1 - scores) * logsig(-s))
    return torch.where(mask, bce, torch.zeros_like(s)).sum(-1)


@register("softmax", kind="listwise", equation="3.9.1", checks={"beta": positive})
def softmax(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """LiPO's softmax cross-entropy: ``-sum_i (score_i / sum_j score_j) * log_softmax(s)_i`` over
    valid responses. Scores must be >= 0 (ValueError otherwise); a row whose scores sum to 0 has
    loss 0."""
    s, scores, mask = listwise_scores(batch, "softmax", beta)
    if bool((scores < 0).any()):
        raise ValueError("loss 'softmax' needs scores >= 0 (they are normalized into target probabilities)")
    total = scores.sum(-1, keepdim=True)
    target = torch.where(total > 0, scores / total.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(scores))
    log_p = torch.log_softmax(torch.where(mask, s, torch.full_like(s, NEG_FILL)), dim=-1)
    return -torch.where(mask, target * log_p, torch.zeros_like(s)).sum(-1)


@register("bt", kind="listwise or pairwise", equation="1", checks={"margin": real},
          extra_keys=("rewards", "chosen_rewards", "rejected_rewards", "margin?"))
def bt(batch: Batch, *, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss, eq. 1: mean over the C(K,2) pairs of a prompt of
    ``-ls(reward_w - reward_l - margin)`` (eq. 1's 1/C(K,2); tied pairs are left out and the mean
    is over the pairs that count; a row without any is 0).

    Listwise batch: ``rewards`` ``[B,K]`` (the reward model's outputs), ``scores``, ``mask``.
    Pairwise batch: ``chosen_rewards``, ``rejected_rewards`` ``[B]`` and optional ``margin``
    ``[B]`` (the pairwise data's margin column; NaN = none, the parameter is used instead).
    margin: required reward gap (Llama-2 style); 0 is plain BT.
    """
    if "chosen_rewards" in batch:
        rw, rl = need(batch, "bt", "chosen_rewards", "rejected_rewards")
        m = batch.get("margin")
        gap = torch.full_like(rw, margin) if m is None else torch.nan_to_num(m.to(rw.dtype), nan=margin)
        return -logsig(rw - rl - gap)
    mask = _mask(batch, "bt")
    rewards, scores = need(batch, "bt", "rewards", "scores")
    rewards = _clean(rewards, mask)
    scores = _clean(scores.to(rewards.dtype), mask)
    pairs = strict_pairs(scores, mask)
    total = _sum_pairs(-logsig(_pair_diff(rewards) - margin), pairs)
    return total / pairs.sum(dim=(-1, -2)).clamp(min=1).to(rewards.dtype)


__all__ = [
    "best_index", "bt", "list_mle", "lipo", "listwise_scores", "order_by_score", "pair_hinge",
    "pair_logistic", "point_mse", "point_sigmoid", "pro", "rrhf", "softmax", "strict_pairs",
]
