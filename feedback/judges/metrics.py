"""Feedback metrics: how trustworthy a judge's labels are.

* ``position_consistency``: share of pairs whose verdict survives swapping the order.
* ``agreement``: AI-labeler alignment (RLAIF): share of labelled pairs where the judge prefers
  the response the reference labels prefer (ties in the labels are skipped; judge ties count
  as half an agreement).
* ``length_bias``: Pearson and Spearman correlation of the preference (judge_prob - 0.5) with
  the length difference len(a) - len(b) in characters; near 0 is unbiased.
* ``win_rate``: (wins + ties/2) / n, alpaca_eval's convention.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def position_consistency(p_ab: Sequence[float], p_ba: Sequence[float], tie_band: float = 0.0) -> float:
    from alignflow.feedback.judges.pairwise import verdicts

    p_ab, p_ba = np.asarray(p_ab, dtype=np.float64), np.asarray(p_ba, dtype=np.float64)
    if not len(p_ab):
        return float("nan")
    return float((verdicts(p_ab, tie_band) == verdicts(p_ba, tie_band)).mean())


def agreement(judge_prob: Sequence[float], label: Sequence[float], tie_band: float = 0.0) -> dict:
    """``judge_prob`` = P(first better); ``label`` = 1 (first better), 0 (second), 0.5 (tie)."""
    p = np.asarray(judge_prob, dtype=np.float64)
    y = np.asarray(label, dtype=np.float64)
    keep = (y != 0.5) & ~np.isnan(y) & ~np.isnan(p)
    p, y = p[keep], y[keep]
    if not len(p):
        return {"agreement": float("nan"), "n": 0, "judge_ties": 0, "label_ties_skipped": int((~keep).sum())}
    judge = np.where(p > 0.5 + tie_band, 1.0, np.where(p < 0.5 - tie_band, 0.0, 0.5))
    credit = np.where(judge == 0.5, 0.5, (judge == y).astype(np.float64))
    return {"agreement": float(credit.mean()), "n": int(len(p)), "judge_ties": int((judge == 0.5).sum()),
            "label_ties_skipped": int((~keep).sum())}


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def length_bias(judge_prob: Sequence[float], len_a: Sequence[int], len_b: Sequence[int]) -> dict:
    p = np.asarray(judge_prob, dtype=np.float64) - 0.5
    d = np.asarray(len_a, dtype=np.float64) - np.asarray(len_b, dtype=np.float64)
    if len(p) < 2 or p.std() == 0 or d.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": int(len(p))}
    pearson = float(np.corrcoef(p, d)[0, 1])
    rp, rd = _rank(p), _rank(d)
    spearman = float(np.corrcoef(rp, rd)[0, 1]) if rp.std() and rd.std() else float("nan")
    return {"pearson": pearson, "spearman": spearman, "n": int(len(p))}


def win_rate(judge_prob: Sequence[float], tie_band: float = 0.0) -> float:
    p = np.asarray(judge_prob, dtype=np.float64)
    if not len(p):
        return float("nan")
    wins = (p > 0.5 + tie_band).sum()
    ties = (np.abs(p - 0.5) <= tie_band).sum()
    return float((wins + 0.5 * ties) / len(p))
