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
