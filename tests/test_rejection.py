"""Rejection sampling: best-of-n, best-vs-worst, margin pairs, listwise, RSO (eq. 4)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alignflow.feedback.rejection import best_of_n, best_vs_worst, margin_pairs, rso_pairs, rso_sample, to_listwise
from alignflow.schemas.validate import validate


def _samples():
    rows = [("p1", "a", 0.1), ("p1", "b", 0.9), ("p1", "c", 0.5), ("p1", "b", 0.2),
            ("p2", "x", 0.3), ("p2", "y", 0.3),  # all tied: no pair
            ("p3", "only", 1.0)]
    return pa.table({"prompt_id": [r[0] for r in rows], "prompt": [f"prompt {r[0]}" for r in rows],
                     "response": [r[1] for r in rows], "reward": [r[2] for r in rows]})


def test_best_of_n_and_best_vs_worst():
    sft = best_of_n(_samples())
    assert dict(zip(sft["prompt_id"].to_pylist(), sft["response"].to_pylist())) == {"p1": "b", "p2": "x", "p3": "only"}
    pairs = best_vs_worst(_samples())
    assert pairs.num_rows == 1  # p2 all tied, p3 single response
    assert pairs["chosen"][0].as_py() == "b" and pairs["rejected"][0].as_py() == "a"
    assert pairs["margin"][0].as_py() == pytest.approx(0.8)
    v = validate(pairs, "pairwise")
    assert v.valid.num_rows == 1 and v.quarantined.num_rows == 0


def test_margin_pairs_and_listwise():
    pairs = margin_pairs(_samples(), min_margin=0.35)
    got = sorted(zip(pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()))
    assert got == [("b", "a"), ("b", "c"), ("c", "a")]
    assert margin_pairs(_samples(), min_margin=0.35, max_pairs=1).num_rows == 1
    lw = to_listwise(_samples())
    assert lw.num_rows == 2 and lw["responses"][0].as_py() == ["a", "b", "c"]
    assert lw["scores"][0].as_py() == [0.1, 0.9, 0.5]  # duplicate "b" keeps its best reward
    assert validate(lw, "listwise").quarantined.num_rows == 0


def test_rso_acceptance_follows_eq4():
    rewards = [0.0, 1.0, 2.0, 3.0]
    rng = np.random.default_rng(0)
    # beta -> 0: only the current best is ever accepted: order of reward
    assert rso_sample(rewards, 4, 1e-6, rng) == [3, 2, 1, 0]
    # first acceptance of index 0 (r=0, r_max=3) happens with rate exp(-3/beta) in the first sweep
    beta, trials = 2.0, 4000
    rng = np.random.default_rng(1)
    first_sweep_hits = sum(0 in rso_sample(rewards, 1, beta, rng) for _ in range(trials))
    # with m=1 the first accepted wins; P(index 0 is the one) is below its eq. 4 rate exp(-1.5)
    assert first_sweep_hits / trials < np.exp(-3 / beta) + 0.03
    counts = np.zeros(4)
    for _ in range(trials):
        counts[rso_sample(rewards, 1, 1.0, rng)[0]] += 1
    assert counts[3] > counts[2] > counts[1] > counts[0]  # higher reward, more often accepted
    with pytest.raises(ValueError):
        rso_sample(rewards, 1, 0.0, rng)


def test_rso_pairs_are_labelled_by_reward_and_seeded():
    a = rso_pairs(_samples(), m=2, beta=0.5, seed=3)
    b = rso_pairs(_samples(), m=2, beta=0.5, seed=3)
    assert a.equals(b)
    for row in a.to_pylist():
        assert row["margin"] > 0 and row["chosen"] != row["rejected"]


# A discrete toy with known probabilities: four answers, pi_sft and rewards given, so the target
# of RSO (eq. 4's statistical rejection sampling) is known exactly: q ~ pi_sft * exp(r / beta).
TOY_PI = np.array([0.5, 0.3, 0.15, 0.05])
TOY_R = np.array([0.0, 1.0, 2.0, 3.0])
TOY_TEXTS = ["w", "x", "y", "z"]


def _tilted(beta: float) -> np.ndarray:
    q = TOY_PI * np.exp(TOY_R / beta)
    return q / q.sum()


def test_rso_accepts_from_the_tilted_target():
    """The first accepted of N candidates drawn from pi_sft follows pi_sft * exp(r / beta):
    chi-square over 4,000 trials (beta 2: q = 0.31 / 0.30 / 0.25 / 0.14, against pi_sft 0.5 / 0.3 /
    0.15 / 0.05)."""
    from scipy.stats import chisquare

    beta, trials = 2.0, 4000
    rng = np.random.default_rng(7)
    counts = np.zeros(4)
    for _ in range(trials):
        kinds = rng.choice(4, size=64, p=TOY_PI)
        counts[kinds[rso_sample(TOY_R[kinds], 1, beta, rng)[0]]] += 1
    expected = _tilted(beta) * trials
    assert chisquare(counts, expected).pvalue > 1e-3, (counts, expected)
    # the test has power: the same counts against pi_sft or against exp(r / beta) alone are rejected
    assert chisquare(counts, TOY_PI * trials).pvalue < 1e-12
    uniform_support = np.exp(TOY_R / beta) / np.exp(TOY_R / beta).sum()
    assert chisquare(counts, uniform_support * trials).pvalue < 1e-12


def test_rso_pairs_keep_the_multiplicity_of_the_samples():
    """rso_pairs on 1,500 prompts of 48 samples each from pi_sft (texts repeat: that repetition
    is pi_sft): two accepted per prompt, so an unordered pair of different answers {i, j}
    appears with probability proportional to q_i * q_j. Chi-square over the 6 kinds of pair.
    Deduplicating the samples first (what the other pair builders do) makes the target
    exp(r / beta) alone, and this test fails."""
    from itertools import combinations

    from scipy.stats import chisquare

    beta, prompts, n = 1.0, 1500, 48
    rng = np.random.default_rng(3)
    kinds = rng.choice(4, size=(prompts, n), p=TOY_PI)
    table = pa.table({"prompt_id": [f"p{i}" for i in range(prompts) for _ in range(n)],
                      "prompt": [f"prompt {i}" for i in range(prompts) for _ in range(n)],
                      "response": [TOY_TEXTS[k] for k in kinds.ravel()],
                      "reward": TOY_R[kinds.ravel()]})
    pairs = rso_pairs(table, m=2, beta=beta, seed=0)
    got = [tuple(sorted((TOY_TEXTS.index(c), TOY_TEXTS.index(r))))
           for c, r in zip(pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist())]
    cells = list(combinations(range(4), 2))
    counts = np.array([got.count(c) for c in cells])
    q = _tilted(beta)
    expected = np.array([q[i] * q[j] for i, j in cells])
    expected = expected / expected.sum() * len(got)
    assert len(got) > 1000 and chisquare(counts, expected).pvalue > 1e-3, (counts, expected.round(1))
    assert all(TOY_R[TOY_TEXTS.index(c)] > TOY_R[TOY_TEXTS.index(r)]
               for c, r in zip(pairs["chosen"].to_pylist(), pairs["rejected"].to_pylist()))
