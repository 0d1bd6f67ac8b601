"""Benchmark: the Bradley-Terry fit behind pairwise -> listwise (``alignflow convert --to listwise``).

100,000 prompts with 4 responses each and all 6 pairs judged (30% of verdicts against a fixed
order, so many prompts hold cycles): 600,000 comparisons, 400,000 items. Baseline, in the same
run: the MM algorithm (Hunter 2004) for the same posterior, the usual way to fit Bradley-Terry,
run for 500 iterations. Prints seconds, the distance of each fit from the maximum (the largest
gradient entry of the log-posterior) and the ratio.

    python tests/bench/bench_bradley_terry.py [--prompts 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from alignflow.feedback.labels.conversions import bradley_terry

PRIOR = 0.1


def synthetic(prompts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(prompts), 6)
    a, b = np.tile([0, 0, 0, 1, 1, 2], prompts), np.tile([1, 2, 3, 2, 3, 3], prompts)
    flip = rng.random(len(a)) < 0.3
    winner, loser = group * 4 + np.where(flip, b, a), group * 4 + np.where(flip, a, b)
    return winner, loser, np.ones(len(winner)), np.arange(4 * prompts) // 4


def mm(winner, loser, weight, n_items, iterations=500):
    """Hunter's MM update for the same posterior (prior: half-wins and half-losses vs r = 0)."""
    wins = np.bincount(winner, weights=weight, minlength=n_items) + PRIOR
    p = np.ones(n_items)
    for _ in range(iterations):
        s = weight / (p[winner] + p[loser])
        denom = np.bincount(winner, s, minlength=n_items) + np.bincount(loser, s, minlength=n_items) + 2 * PRIOR / (p + 1)
        p = wins / denom
    return np.log(p)


def max_gradient(r, winner, loser, weight):
    """Largest entry of the log-posterior's gradient: 0 at the maximum."""
    q = weight / (1 + np.exp(r[winner] - r[loser]))
    grad = np.bincount(winner, q, len(r)) - np.bincount(loser, q, len(r)) - PRIOR * np.tanh(r / 2)
    return float(np.abs(grad).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100_000)
    args = ap.parse_args()
    winner, loser, weight, groups = synthetic(args.prompts)
    n_items = len(groups)
    t0 = time.process_time()
    baseline = mm(winner, loser, weight, n_items)
    t_mm = time.process_time() - t0
    t0 = time.process_time()
    ours = bradley_terry(winner, loser, weight, n_items, prior=PRIOR, groups=groups)
    t_newton = time.process_time() - t0
    print(f"{len(winner):,} comparisons, {n_items:,} items in {args.prompts:,} groups")
    print(f"baseline MM, 500 iterations: {t_mm:.2f} CPU-s, largest gradient {max_gradient(baseline, winner, loser, weight):.1e}")
    print(f"alignflow (batched Newton):  {t_newton:.2f} CPU-s, largest gradient {max_gradient(ours, winner, loser, weight):.1e}")
    print(f"ratio: {t_mm / t_newton:.1f}x faster; largest |r_MM - r_Newton| = {np.abs(baseline - ours).max():.1e}")


if __name__ == "__main__":
    main()
