"""Judges applied to Arrow tables of the store's kinds (plain functions for flows to compose).

* ``judge_pairwise_table(pairwise, judge)``: adds ``judge_prob`` (P(chosen better), position
  averaged) and ``judge_consistent`` to a ``pairwise`` table; returns it and the judgement.
* ``candidate_pairs(samples, pairs_per_prompt, seed)``: distinct-response pairs per prompt.
* ``label_pairs(candidates, judge)``: a ``pairwise`` table labelled by the judge (ties dropped,
  counted), ``chosen`` = the preferred side, ``margin`` = |2 p - 1|, ``source`` = "ai".
* ``score_samples(samples, judge)``: adds ``reward`` from a pointwise judge.
* ``rank_samples(samples, judge)``: a ``listwise`` table from a listwise judge.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.judges.pairwise import PairwiseJudge, PairwiseJudgement
from alignflow.schemas.prompts import to_messages_array


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column(name, values)


def group_indices(prompt_ids: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """Row indices of each prompt, prompts in order of first appearance (vectorised grouping)."""
    ids = pc.dictionary_encode(prompt_ids).combine_chunks() if isinstance(prompt_ids, pa.ChunkedArray) \
        else pc.dictionary_encode(prompt_ids)
    codes = ids.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds) if len(order) else []


def judge_pairwise_table(table: pa.Table, judge: PairwiseJudge,
                         progress: Callable[[int], None] | None = None) -> tuple[pa.Table, PairwiseJudgement]:
    prompts = table.column("prompt").to_pylist()
    result = judge.judge(prompts, table.column("chosen").to_pylist(), table.column("rejected").to_pylist(),
                         progress=progress)
    table = _set(table, "judge_prob", pa.array(result.judge_prob, pa.float64()))
    table = _set(table, "judge_consistent", pa.array(result.consistent, pa.bool_()))
    return table, result


def candidate_pairs(samples: pa.Table, pairs_per_prompt: int = 1, seed: int = 0) -> pa.Table:
    """Pairs of distinct responses per prompt (seeded), as ``prompt_id, prompt, response_a, response_b``."""
    rng = np.random.default_rng(seed)
    responses = samples.column("response").to_pylist()
    rows_a, rows_b = [], []
    for idx in group_indices(samples.column("prompt_id")):
        uniq: dict[str, int] = {}
        for i in idx:
            uniq.setdefault(responses[i], int(i))
        cand = list(uniq.values())
        if len(cand) < 2:
            continue
        all_pairs = [(a, b) for x, a in enumerate(cand) for b in cand[x + 1:]]
        take = rng.choice(len(all_pairs), size=min(pairs_per_prompt, len(all_pairs)), replace=False)
        for t in sorted(take):
            a, b = all_pairs[t]
            if rng.random() < 0.5:  # which side is "a" is random: no systematic order in the data
                a, b = b, a
            rows_a.append(a)
            rows_b.append(b)
    base = samples.select(["prompt_id", "prompt"]).take(pa.array(rows_a, pa.int64()))
    return base.append_column("response_a", samples.column("response").take(pa.array(rows_a, pa.int64()))) \
               .append_column("response_b", samples.column("response").take(pa.array(rows_b, pa.int64())))


def label_pairs(candidates: pa.Table, judge: PairwiseJudge, criteria: list[str | None] | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[pa.Table, PairwiseJudgement, dict]:
    """A ``pairwise`` table labelled by the judge. Ties (within the judge's tie band) are dropped.
    ``criteria``: optional per-pair principle the judge is told to judge by."""
    result = judge.judge(candidates.column("prompt").to_pylist(), candidates.column("response_a").to_pylist(),
                         candidates.column("response_b").to_pylist(), criteria=criteria, progress=progress)
    p = result.judge_prob
    keep = ~result.tie
    a_wins = p > 0.5
    a, b = candidates.column("response_a"), candidates.column("response_b")
    mask = pa.array(a_wins)
    chosen, rejected = pc.if_else(mask, a, b), pc.if_else(mask, b, a)
    prob_chosen = np.where(a_wins, p, 1.0 - p)
    out = pa.table({
        "prompt_id": candidates.column("prompt_id"),
        "prompt": to_messages_array(candidates.column("prompt")),
        "chosen": chosen, "rejected": rejected,
        "margin": pa.array(np.abs(2.0 * p - 1.0), pa.float64()),
        "source": pa.array(["ai"] * len(p), pa.string()),
        "judge_prob": pa.array(prob_chosen, pa.float64()),
        "judge_consistent": pa.array(result.consistent, pa.bool_()),
    }).filter(pa.array(keep))
    counts = {"candidates": int(len(p)), "labelled": int(keep.sum()), "ties_dropped": int((~keep).sum()),
              "truncated_to_context": int(result.truncated)}
    return out, result, counts


def score_samples(samples: pa.Table, judge: Any, column: str = "reward") -> pa.Table:
    scores = judge.score(samples.column("prompt").to_pylist(), samples.column("response").to_pylist())
    return _set(samples, column, pa.array(np.asarray(scores, dtype=np.float64), pa.float64()))


def rank_samples(samples: pa.Table, judge: Any) -> pa.Table:
    """One ``listwise`` row per prompt with the judge's debiased scores."""
    groups = group_indices(samples.column("prompt_id"))
    responses = samples.column("response").to_pylist()
    firsts = pa.array([int(g[0]) for g in groups], pa.int64())
    base = samples.select(["prompt_id", "prompt"]).take(firsts)
    lists = [[responses[i] for i in g] for g in groups]
    scores = judge.rank(base.column("prompt").to_pylist(), lists)
    return base.append_column("responses", pa.array(lists, pa.list_(pa.string()))) \
               .append_column("scores", pa.array(scores, pa.list_(pa.float64())))
