"""Pairwise preference losses on sequence log-prob summaries (survey sections 3.3, 3.7, 3.8, 3.10-3.12).

Batch keys (all ``Tensor[B]``, float32 or float64): ``chosen_logps``, ``rejected_logps`` (policy,
summed over response tokens), ``ref_chosen_logps``, ``ref_rejected_logps``, ``chosen_tokens``,
``rejected_tokens``. Notation as DESIGN.md: ``r_w = chosen_logps - ref_chosen_logps``, likewise
``r_l``, ``D = r_w - r_l``, ``a_w = chosen_logps / chosen_tokens``, ``ls = log sigmoid``.
Every function returns per-example losses ``Tensor[B]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._util import clamped_exp, clamped_expm1, log1mexp, logsig, mean_logp, need
from .registry import in_range, non_negative, one_of, optional_positive_int, positive, real, register

Batch = Mapping[str, torch.Tensor]


def implicit_rewards(batch: Batch, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_w, r_l)``: policy minus reference log-probs of chosen and rejected, each ``[B]``."""
    c, r, rc, rr = need(batch, loss, "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    return c - rc, r - rr


def mean_logps(batch: Batch, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_w, a_l)``: mean per-token log-probs of chosen and rejected, each ``[B]``."""
    c, r, tc, tr = need(batch, loss, "chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
    return mean_logp(c, tc), mean_logp(r, tr)


@register("dpo", kind="pairwise", equation="10, 12",
          checks={"beta": positive, "label_smoothing": in_range(0.0, 0.5)})
def dpo(batch: Batch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, eq. 10; with ``label_smoothing`` e > 0 the conservative cDPO of eq. 12.

    ``-(1-e)*ls(beta*D) - e*ls(-beta*D)``. beta: KL strength; e: assumed label-flip rate in [0, 0.5].
    """
    r_w, r_l = implicit_rewards(batch, "dpo")
    z = beta * (r_w - r_l)
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


@register("ipo", kind="pairwise", equation="17", checks={"beta": positive})
def ipo(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """IPO, eq. 17: ``(D - 1/(2*beta))**2`` on summed log-probs (not per-token means, unlike TRL)."""
    r_w, r_l = implicit_rewards(batch, "ipo")
    return (r_w - r_l - 1 / (2 * beta)) ** 2


@register("hinge", kind="pairwise", equation="3.3.2 (RSO)", checks={"beta": positive})
def hinge(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """RSO's hinge loss on the DPO margin (section 3.3.2): ``relu(1 - beta*D)``."""
    r_w, r_l = implicit_rewards(batch, "hinge")
    return F.relu(1 - beta * (r_w - r_l))


@register("slic", kind="pairwise", equation="3", checks={"delta": non_negative, "lam": non_negative})
def slic(batch: Batch, *, delta: float = 1.0, lam: float = 0.0) -> torch.Tensor:
    """SLiC-HF, eq. 3: ``relu(delta - chosen_logps + rejected_logps) - lam*a_w``.

    delta: margin between summed log-probs; lam: weight of the chosen-response NLL regularizer
    (DESIGN.md uses the chosen response as eq. 3's y_ref, as mean per-token NLL).
    """
    c, r = need(batch, "slic", "chosen_logps", "rejected_logps")
    a_w, _ = mean_logps(batch, "slic")
    return F.relu(delta - c + r) - lam * a_w


@register("dpop", kind="pairwise", equation="13", checks={"beta": positive, "lam": non_negative})
def dpop(batch: Batch, *, beta: float = 0.1, lam: float = 50.0) -> torch.Tensor:
    """DPO-Positive (Smaug), eq. 13, penalty inside the sigmoid as in the DPOP paper:
    ``-ls(beta*(D - lam*relu(ref_chosen_logps - chosen_logps)))``. lam: weight of the penalty on
    the chosen log-prob falling below the reference."""
    r_w, r_l = implicit_rewards(batch, "dpop")
    penalty = F.relu(-r_w)
    return -logsig(beta * (r_w - r_l - lam * penalty))


@register("rdpo", kind="pairwise", equation="46", checks={"beta": positive, "alpha": real})
def rdpo(batch: Batch, *, beta: float = 0.1, alpha: float = 0.01) -> torch.Tensor:
    """R-DPO, eq. 46: ``-ls(beta*D - alpha*(chosen_tokens - rejected_tokens))``; alpha: per-token
    length penalty (alpha*|y| enters the reward, eq. 45)."""
    r_w, r_l = implicit_rewards(batch, "rdpo")
    t_w, t_l = need(batch, "rdpo", "chosen_tokens", "rejected_tokens")
    length_gap = t_w.to(r_w.dtype) - t_l.to(r_w.dtype)
    return -logsig(beta * (r_w - r_l) - alpha * length_gap)


@register("simpo", kind="pairwise", equation="47", checks={"beta": positive, "gamma": real})
def simpo(batch: Batch, *, beta: float = 2.0, gamma: float = 0.5) -> torch.Tensor:
    """SimPO, eq. 47 (reference-free): ``-ls(beta*(a_w - a_l) - gamma)``; beta is the survey's alpha
    (reward scale), gamma the target reward margin."""
    a_w, a_l = mean_logps(batch, "simpo")
    return -logsig(beta * (a_w - a_l) - gamma)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log-odds (eq. 40) of a mean per-token log-prob a <= 0: ``a - log(1 - exp(a))``,
    stable as a -> 0 (see ``log1mexp``)."""
    return mean_logps - log1mexp(mean_logps)


@register("orpo", kind="pairwise", equation="40-42", checks={"lam": non_negative})
def orpo(batch: Batch, *, lam: float = 0.1) -> torch.Tensor:
    """ORPO, eq. 40-42 (reference-free): ``-a_w - lam*ls(lo_w - lo_l)``, ``lo = a - log(1-exp(a))``
    the log-odds of the mean per-token log-probs; lam: weight of the odds-ratio term."""
    a_w, a_l = mean_logps(batch, "orpo")
    return -a_w - lam * logsig(log_odds(a_w) - log_odds(a_l))


@register("cpo", kind="pairwise", equation="54", checks={"beta": positive, "alpha": non_negative})
def cpo(batch: Batch, *, beta: float = 0.1, alpha: float = 1.0) -> torch.Tensor:
    """CPO, eq. 54 (reference-free): ``-ls(beta*(chosen_logps - rejected_logps)) - alpha*a_w``
    (the NLL term as mean per-token, DESIGN.md); alpha: weight of the NLL term."""
    c, r = need(batch, "cpo", "chosen_logps", "rejected_logps")
    a_w, _ = mean_logps(batch, "cpo")
    return -logsig(beta * (c - r)) - alpha * a_w


def f_divergence_reward(r: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """``f'(exp(r))`` up to an additive constant (which cancels in ``g(r_w) - g(r_l)``), eq. 67.

    reverse_kl (f = x log x): r; forward_kl (f = -log x): -exp(-r); js: log 2 + ls(r);
    alpha-divergence: (1 - exp(-alpha*r))/alpha. Exponent arguments are clamped (EXP_ARG_MAX).
    """
    if divergence == "reverse_kl":
        return r
    if divergence == "forward_kl":
        return -clamped_exp(-r)
    if divergence == "js":
        return math.log(2.0) + logsig(r)  # log 2 + r - log(1 + exp(r)), stably
    if divergence == "alpha":
        return -clamped_expm1(-alpha * r) / alpha
    raise ValueError(f"unknown divergence {divergence!r}")


@register("fdpo", kind="pairwise", equation="63-67",
          checks={"beta": positive, "divergence": one_of("reverse_kl", "forward_kl", "js", "alpha"),
                  "alpha": in_range(0.0, 1.0, lo_open=True, hi_open=True)})
def fdpo(batch: Batch, *, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO, eq. 63-67: ``-ls(g(r_w) - g(r_l))``, ``g(r) = beta*f'(exp(r))``.

    divergence: reverse_kl (= DPO), forward_kl, js, alpha; alpha: the alpha-divergence's alpha,
    in (0, 1) as in the f-DPO paper (used only when divergence == "alpha").
    """
    r_w, r_l = implicit_rewards(batch, "fdpo")
    g_w = beta * f_divergence_reward(r_w, divergence, alpha)
    g_l = beta * f_divergence_reward(r_l, divergence, alpha)
    return -logsig(g_w - g_l)


GPO_FUNCTIONS = ("logistic", "hinge", "square", "exponential", "truncated_square", "savage")


@register("gpo", kind="pairwise", equation="18", checks={"beta": positive, "f": one_of(*GPO_FUNCTIONS)})
def gpo(batch: Batch, *, beta: float = 0.1, f: str = "logistic") -> torch.Tensor:
    """GPO, eq. 18: ``f(beta*D)`` with a convex f: logistic ``-ls(z)``, hinge ``relu(1-z)``,
    square ``(z-1)**2``, exponential ``exp(-z)`` (argument clamped at EXP_ARG_MAX),
    truncated_square ``relu(1-z)**2``, savage ``sigmoid(-z)**2``."""
    r_w, r_l = implicit_rewards(batch, "gpo")
    z = beta * (r_w - r_l)
    if f == "logistic":
        return -logsig(z)
    if f == "hinge":
        return F.relu(1 - z)
    if f == "square":
        return (z - 1) ** 2
    if f == "exponential":
        return clamped_exp(-z)
    if f == "truncated_square":
        return F.relu(1 - z) ** 2
    if f == "savage":
        return torch.sigmoid(-z) ** 2
    raise ValueError(f"unknown GPO function {f!r}")


@register("sppo", kind="pairwise", equation="60-61", checks={"beta": positive},
          extra_keys=("chosen_winrate?", "rejected_winrate?"))
def sppo(batch: Batch, *, beta: float = 0.1) -> torch.Tensor:
    """SPPO, eq. 60-61, on a pair: ``(r_w - (p_w - 0.5)/beta)**2 + (r_l - (p_l - 0.5)/beta)**2``.

    Optional batch keys ``chosen_winrate``, ``rejected_winrate`` ``[B]`` in [0, 1]: the estimated
    P(y > pi_t | x) of each response (eq. 61's win-rate); absent, they default to 1 and 0 (the
    hard labels of a preference pair). The reference is the previous iterate pi_t; 1/beta is eta.
    """
    r_w, r_l = implicit_rewards(batch, "sppo")
    p_w = batch.get("chosen_winrate")
    p_l = batch.get("rejected_winrate")
    p_w = torch.ones_like(r_w) if p_w is None else p_w.to(r_w.dtype)
    p_l = torch.zeros_like(r_l) if p_l is None else p_l.to(r_l.dtype)
    return (r_w - (p_w - 0.5) / beta) ** 2 + (r_l - (p_l - 0.5) / beta) ** 2


@dataclass
class BetaDPOState:
    """Running mean M0 of the beta-DPO reward discrepancy (eq. 14), updated in place.

    ``m0`` starts unset (the first batch's mean is used, so the first batch beta is beta0);
    after each call ``m0 <- momentum*m0 + (1-momentum)*mean_batch(M)`` as in the beta-DPO paper.
    Keep one per training run; do not pass it to evaluation calls (they would update it).
    """

    m0: float | None = None
    momentum: float = 0.9

    def update(self, batch_mean: float) -> None:
        self.m0 = batch_mean if self.m0 is None else self.momentum * self.m0 + (1 - self.momentum) * batch_mean


def _m0_check(v: Any) -> str | None:
    ok = v is None or isinstance(v, BetaDPOState) or (real(v) is None)
    return None if ok else "must be None, a finite number or a BetaDPOState"


@register("beta_dpo", kind="pairwise", equation="14",
          checks={"beta": positive, "alpha": real, "m0": _m0_check,
                  "keep_ratio": in_range(0.0, 1.0, lo_open=True)})
def beta_dpo(batch: Batch, *, beta: float = 0.1, alpha: float = 0.6, m0: Any = None,
             keep_ratio: float = 0.8) -> torch.Tensor:
    """beta-DPO, eq. 14: DPO with a batch-level beta and beta-guided outlier filtering.

    M_i = D_i (DESIGN.md; detached). Filtering: keep the ceil(keep_ratio*B) examples whose M_i is
    closest to M0 and drop the rest (loss 0). The paper samples that subset with probability
    proportional to a Gaussian around M0; keeping the most probable ones is its deterministic
    mode, which keeps this function pure. Then
    ``beta_batch = (1 + alpha*(mean_kept(M) - M0)) * beta`` (floored at beta/1000, so a very low
    batch mean cannot flip the sign), and kept examples get ``-ls(beta_batch*D_i) * B/n_kept``
    (so the batch mean equals the mean over kept examples).

    m0: None (M0 = this batch's mean M, i.e. beta_batch = beta), a float, or a ``BetaDPOState``
    holding the running mean (the only in-place side effect of any loss here: the state is
    updated with this batch's mean M after use). keep_ratio: fraction kept, in (0, 1] (1 = no
    filtering); the paper's rho.
    """
    r_w, r_l = implicit_rewards(batch, "beta_dpo")
    margin = r_w - r_l
    m = margin.detach()
    batch_mean = float(m.mean())
    if isinstance(m0, BetaDPOState):
        m0_value = batch_mean if m0.m0 is None else m0.m0
        m0.update(batch_mean)
    elif m0 is None:
        m0_value = batch_mean
    else:
        m0_value = float(m0)
    n = m.shape[0]
    n_keep = max(1, math.ceil(keep_ratio * n - 1e-9))
    keep_idx = torch.topk(-(m - m0_value).abs(), n_keep).indices
    keep = torch.zeros_like(m, dtype=torch.bool).index_fill(0, keep_idx, True)
    beta_batch = (1 + alpha * (m[keep].mean() - m0_value)) * beta
    beta_batch = beta_batch.clamp(min=beta * 1e-3)
    losses = -logsig(beta_batch * margin)
    return torch.where(keep, losses * (n / n_keep), torch.zeros_like(losses))


@register("nn", kind="pairwise", equation="53",
          checks={"gamma": positive, "alpha": positive, "K": optional_positive_int},
          extra_keys=("sample_logps", "ref_sample_logps", "sample_mask?"))
def negating_negatives(batch: Batch, *, gamma: float = 0.1, alpha: float = 0.1, K: int | None = None) -> torch.Tensor:
    """Negating Negatives (D2O), eq. 53:
    ``-ls((gamma/K)*sum_i (sample_logps_i - ref_sample_logps_i) - alpha*(rejected_logps - ref_rejected_logps))``.

    Extra batch keys: ``sample_logps`` ``[B,K]`` (policy log-probs of K responses sampled from the
    reference pi_ref), ``ref_sample_logps`` ``[B,K]`` (their pi_ref log-probs), optional
    ``sample_mask`` ``[B,K]`` bool (padding samples count nowhere; the mean is over valid ones).
    ``ref_rejected_logps`` holds the log-probs of y_l under pi_ref^+ (eq. 53's second reference).
    ``chosen_*`` keys are not used. K: use only the first K sample columns (None = all).
    Defaults gamma = alpha = 0.1 follow the paper's beta-scale (DESIGN.md gives none).
    """
    s, rs, rl, rrl = need(batch, "nn", "sample_logps", "ref_sample_logps", "rejected_logps", "ref_rejected_logps")
    mask = batch.get("sample_mask")
    mask = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if K is not None:
        s, rs, mask = s[:, :K], rs[:, :K], mask[:, :K]
    ratio = torch.where(mask, s - rs, torch.zeros_like(s))
    mean_ratio = ratio.sum(-1) / mask.sum(-1).clamp(min=1).to(s.dtype)
    return -logsig(gamma * mean_ratio - alpha * (rl - rrl))


def pairwise_metrics(batch: Batch, beta: float = 0.1) -> dict[str, torch.Tensor]:
    """Batch-mean metrics for logging a pairwise run (detached 0-dim tensors; gather then .item()).

    rewards/chosen = mean(beta*r_w), rewards/rejected = mean(beta*r_l), rewards/margins =
    mean(beta*D), rewards/accuracies = mean(beta*r_w > beta*r_l) (ties count as wrong),
    logps/chosen, logps/rejected = mean policy log-probs, kl/implicit = mean over both responses of
    (ref_logps - logps): an estimate of KL(pi_ref || pi_theta), unbiased when the responses are
    samples of the reference (offline data from the SFT model); 0 at step 1 when policy == ref.
    """
    with torch.no_grad():
        r_w, r_l = implicit_rewards(batch, "pairwise_metrics")
        c, r = need(batch, "pairwise_metrics", "chosen_logps", "rejected_logps")
        rw, rl = beta * r_w, beta * r_l
        return {
            "rewards/chosen": rw.mean(),
            "rewards/rejected": rl.mean(),
            "rewards/margins": (rw - rl).mean(),
            "rewards/accuracies": (rw > rl).to(rw.dtype).mean(),
            "logps/chosen": c.mean(),
            "logps/rejected": r.mean(),
            "kl/implicit": -0.5 * (r_w + r_l).mean(),
        }
