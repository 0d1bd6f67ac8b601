"""Rejection sampling: scored samples -> sft / pairwise / listwise data.

Input: a ``samples`` table with a ``reward`` column (from any pointwise judge, a reward model
or a verifier; ``feedback.judges.tables.score_samples``). Grouped by ``prompt_id``:

* ``best_of_n``: the highest-reward response per prompt -> ``sft`` (ties: first sampled).
* ``best_vs_worst``: max vs min reward -> ``pairwise`` (as SLiC sample-rank, self-rewarding and
  DNO use it); prompts whose rewards all tie give no pair (never chosen == rejected).
* ``margin_pairs``: every pair with ``r_i - r_j >= min_margin`` (largest first, at most
  ``max_pairs`` per prompt) -> ``pairwise``.
* ``to_listwise``: all responses with their rewards as scores -> ``listwise``.
* ``rso_sample`` / ``rso_pairs``: RSO's statistical rejection sampling (survey eq. 4): accept y
  with probability ``exp((r(x, y) - r_max) / beta)``, r_max the largest reward still among the
  candidates, sweeping until ``m`` are accepted; accepted responses are paired in draw order
  and each pair labelled by reward -> ``pairwise``. Accepted samples follow the tilted target
  ``pi_sft(y) exp(r(y) / beta)`` (normalised) only if the candidates keep their multiplicity:
  how often pi_sft sampled a text is its pi_sft factor.

Except for RSO, identical response texts of one prompt are deduplicated first (keeping the best
reward): a pair of equal texts teaches nothing. ``margin`` = reward difference; ``source`` = "model"
(reward model / judge) or what the caller passes ("rule" for verifiers).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pyarrow as pa

from alignflow.schemas.prompts import to_messages_array


def _groups(samples: pa.Table, reward: str, unique: bool = True):
    """Per prompt: (first row index, responses, rewards) over the rows with a reward; with
    ``unique`` one entry per distinct text (its best reward), else every row."""
    import pyarrow.compute as pc

    ids = pc.dictionary_encode(samples.column("prompt_id").combine_chunks())
    codes = ids.indices.to_numpy(zero_copy_only=False)
    r = samples.column(reward).to_numpy(zero_copy_only=False).astype(np.float64)
    texts = samples.column("response").to_pylist()
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for idx in (np.split(order, bounds) if len(order) else []):
        if not unique:
            keep = [i for i in idx if not math.isnan(r[i])]
            yield int(idx[0]), [texts[i] for i in keep], r[keep]
            continue
        best: dict[str, float] = {}
        for i in idx:
            if not math.isnan(r[i]) and (texts[i] not in best or r[i] > best[texts[i]]):
                best[texts[i]] = r[i]
        yield int(idx[0]), list(best), np.array(list(best.values()), dtype=np.float64)


def _base(samples: pa.Table, rows: Sequence[int]) -> dict:
    t = samples.select(["prompt_id", "prompt"]).take(pa.array(rows, pa.int64()))
    return {"prompt_id": t.column("prompt_id"), "prompt": to_messages_array(t.column("prompt"))}


def _pairs_table(samples, rows, chosen, rejected, margins, source) -> pa.Table:
    return pa.table({**_base(samples, rows), "chosen": pa.array(chosen, pa.string()),
                     "rejected": pa.array(rejected, pa.string()), "margin": pa.array(margins, pa.float64()),
                     "source": pa.array([source] * len(rows), pa.string())})


def best_of_n(samples: pa.Table, reward: str = "reward") -> pa.Table:
    rows, resp, rew = [], [], []
    for first, texts, r in _groups(samples, reward):
        if len(texts):
            k = int(np.argmax(r))
            rows.append(first)
            resp.append(texts[k])
            rew.append(r[k])
    return pa.table({**_base(samples, rows), "response": pa.array(resp, pa.string()),
                     "reward": pa.array(rew, pa.float64())})


def best_vs_worst(samples: pa.Table, reward: str = "reward", source: str = "model", min_margin: float = 0.0) -> pa.Table:
    rows, ch, rj, mg = [], [], [], []
    for first, texts, r in _groups(samples, reward):
        if len(texts) < 2:
            continue
        hi, lo = int(np.argmax(r)), int(np.argmin(r))
        if r[hi] - r[lo] <= min_margin or r[hi] == r[lo]:
            continue  # all tied (or too close): no preference to learn
        rows.append(first)
        ch.append(texts[hi])
        rj.append(texts[lo])
        mg.append(r[hi] - r[lo])
    return _pairs_table(samples, rows, ch, rj, mg, source)


def margin_pairs(samples: pa.Table, min_margin: float, reward: str = "reward", max_pairs: int | None = None,
                 source: str = "model") -> pa.Table:
    rows, ch, rj, mg = [], [], [], []
    for first, texts, r in _groups(samples, reward):
        diff = r[:, None] - r[None, :]  # [K, K]: diff[i, j] = r_i - r_j
        i_idx, j_idx = np.nonzero((diff >= min_margin) & (diff > 0))
        order = np.argsort(-diff[i_idx, j_idx], kind="stable")[:max_pairs]
        for i, j in zip(i_idx[order], j_idx[order]):
            rows.append(first)
            ch.append(texts[i])
            rj.append(texts[j])
            mg.append(float(diff[i, j]))
    return _pairs_table(samples, rows, ch, rj, mg, source)


def to_listwise(samples: pa.Table, reward: str = "reward", min_responses: int = 2) -> pa.Table:
    rows, lists, scores = [], [], []
    for first, texts, r in _groups(samples, reward):
        if len(texts) >= min_responses:
            rows.append(first)
            lists.append(texts)
            scores.append(r.tolist())
    return pa.table({**_base(samples, rows), "responses": pa.array(lists, pa.list_(pa.string())),
                     "scores": pa.array(scores, pa.list_(pa.float64()))})


def rso_sample(rewards: Sequence[float], m: int, beta: float, rng: np.random.Generator) -> list[int]:
    """Indices accepted by RSO's statistical rejection sampling (survey eq. 4).

    Sweeps the remaining candidates in random order; each is accepted with probability
    ``exp((r - r_max) / beta)`` (r_max: the largest reward still among the candidates, so the
    best remaining one is always accepted); accepted ones leave the pool and r_max is
    recomputed after each sweep, until ``m`` are accepted or none remain.
    beta -> inf accepts uniformly at random; beta -> 0 accepts in order of reward.
    """
    if beta <= 0:
        raise ValueError("beta must be > 0")
    r = np.asarray(rewards, dtype=np.float64)
    remaining = list(range(len(r)))
    accepted: list[int] = []
    while remaining and len(accepted) < m:
        r_max = r[remaining].max()
        taken = []
        for i in rng.permutation(remaining):
            if rng.uniform() < math.exp((r[i] - r_max) / beta):
                accepted.append(int(i))
                taken.append(int(i))
                if len(accepted) == m:
                    break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rso_pairs(samples: pa.Table, m: int = 4, beta: float = 0.5, reward: str = "reward", seed: int = 0,
              source: str = "model") -> pa.Table:
    """RSO: accept ``m`` responses per prompt (eq. 4), pair them in draw order, label by reward.

    Candidates keep their multiplicity (a text sampled twice is twice as likely to be accepted:
    the pi_sft factor of the target); a pair of equal rewards (equal texts included) is skipped."""
    rng = np.random.default_rng(seed)
    rows, ch, rj, mg = [], [], [], []
    for first, texts, r in _groups(samples, reward, unique=False):
        acc = rso_sample(r, m, beta, rng)
        for a, b in zip(acc[0::2], acc[1::2]):
            if r[a] == r[b] or texts[a] == texts[b]:
                continue
            hi, lo = (a, b) if r[a] > r[b] else (b, a)
            rows.append(first)
            ch.append(texts[hi])
            rj.append(texts[lo])
            mg.append(r[hi] - r[lo])
    return _pairs_table(samples, rows, ch, rj, mg, source)
