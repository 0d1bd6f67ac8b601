"""A termination rule for iterative / online training (survey 4.6 calls the question open).

After iteration t, responses of pi^t and pi^{t-1} to the same held-out prompts are compared
(by a position-debiased pairwise judge, i.e. P(a > b) averaged over both orders, or by a
reward function). Training continues only while

1. the held-out win-rate of t over t-1 is significantly above one half: a one-sided exact
   binomial test of ``wins`` out of ``wins + losses`` decisive comparisons (ties split evenly,
   counted as half a win and half a loss, rounded down) at level ``alpha``; and
2. the held-out mean reward still rises (by more than ``min_delta``) over the previous iterate.

``winrate_test`` returns the evidence; ``should_stop`` returns the decision and the reason,
both written verbatim into the run's report.
"""

from __future__ import annotations

from typing import Sequence


def winrate_test(wins: float, losses: float, ties: float = 0.0, alpha: float = 0.05) -> dict:
    """One-sided binomial test of H0: win-rate <= 1/2 against H1: > 1/2.

    ``wins``/``losses``/``ties`` may be fractional (a judge's probabilities summed); ties are
    split evenly. Returns ``{wins, losses, ties, n, win_rate, p_value, alpha, significant}``.
    """
    from scipy.stats import binomtest

    w = wins + ties / 2.0
    total = wins + losses + ties
    n = int(round(total))
    k = int(w) if n else 0  # conservative: a fractional win is not counted
    p_value = float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else 1.0
    return {"wins": float(wins), "losses": float(losses), "ties": float(ties), "n": n,
            "win_rate": (w / total) if total else float("nan"), "p_value": p_value, "alpha": alpha,
            "significant": bool(n and p_value < alpha)}


def count_outcomes(probs: Sequence[float], tie_band: float = 0.05) -> tuple[int, int, int]:
    """(wins, losses, ties) from position-debiased P(new > old) per held-out prompt; a
    probability within ``tie_band`` of 1/2 is a tie (a judge disagreeing with itself across
    orders averages to about 1/2)."""
    wins = sum(p > 0.5 + tie_band for p in probs)
    losses = sum(p < 0.5 - tie_band for p in probs)
    return wins, losses, len(probs) - wins - losses


def should_stop(evidence: dict | None, reward_history: Sequence[float] = (), min_delta: float = 0.0) -> tuple[bool, str]:
    """The rule: stop when the win-rate test is not significant, or the held-out reward of
    the newest iterate is not above the previous one by more than ``min_delta``."""
    if evidence is not None and not evidence["significant"]:
        return True, (f"win-rate of iteration t over t-1 is {evidence['win_rate']:.3f} "
                      f"(p = {evidence['p_value']:.3g} >= alpha = {evidence['alpha']}): not significantly above 1/2")
    if len(reward_history) >= 2 and reward_history[-1] - reward_history[-2] <= min_delta:
        return True, (f"held-out reward stopped rising: {reward_history[-2]:.4f} -> {reward_history[-1]:.4f}")
    return False, "continue: win-rate significant and reward rising"
