"""Preference datasets from scored samples: K responses per prompt with a reward each.

Used to turn on-policy samples (e.g. of the toy world's SFT model, scored by a programmatic
reward) into the pairwise, listwise and binary kinds of the store, ready for the trainer.
Inputs are aligned per prompt: ``prompts[i]``, ``responses[i]`` (K_i strings), ``rewards[i]``
(K_i floats). Outputs are pyarrow tables with the kind's columns (``schemas.kinds``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa


def _check(prompts, responses, rewards) -> None:
    if not (len(prompts) == len(responses) == len(rewards)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} response lists, {len(rewards)} reward lists")
    for i, (r, s) in enumerate(zip(responses, rewards)):
        if len(r) != len(s):
            raise ValueError(f"prompt {i}: {len(r)} responses but {len(s)} rewards")


def pairwise_from_samples(prompts: Sequence, responses: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                          min_margin: float = 1e-9, all_pairs: bool = False) -> pa.Table:
    """Best vs worst response per prompt (or every pair with ``all_pairs``), margin = reward gap.

    Pairs whose rewards differ by less than ``min_margin`` (ties) are dropped.
    """
    _check(prompts, responses, rewards)
    rows = {"prompt": [], "chosen": [], "rejected": [], "margin": []}
    for p, resps, scores in zip(prompts, responses, rewards):
        s = np.asarray(scores, dtype=float)
        if all_pairs:
            pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] - s[j] >= min_margin]
        else:
            pairs = [(int(s.argmax()), int(s.argmin()))] if len(s) and s.max() - s.min() >= min_margin else []
        for i, j in pairs:
            rows["prompt"].append(p)
            rows["chosen"].append(resps[i])
            rows["rejected"].append(resps[j])
            rows["margin"].append(float(s[i] - s[j]))
    rows["margin"] = pa.array(rows["margin"], pa.float64())
    return pa.table({**rows, "source": ["rule"] * len(rows["prompt"])})


def listwise_from_samples(prompts: Sequence, responses: Sequence[Sequence[str]],
                          rewards: Sequence[Sequence[float]], min_spread: float = 1e-9) -> pa.Table:
    """All K responses of a prompt with their rewards as scores; prompts whose rewards are all
    equal (nothing to rank) are dropped."""
    _check(prompts, responses, rewards)
    keep = [i for i, s in enumerate(rewards) if len(s) > 1 and max(s) - min(s) >= min_spread]
    return pa.table({"prompt": [prompts[i] for i in keep], "responses": [list(responses[i]) for i in keep],
                     "scores": [[float(x) for x in rewards[i]] for i in keep]})


def binary_from_samples(prompts: Sequence, responses: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                        threshold: float | None = None, only: bool | None = None) -> pa.Table:
    """One row per response, ``label`` = reward above the prompt's mean (or above ``threshold``).

    Responses exactly at the prompt mean (e.g. all K equal) carry no signal and are dropped.
    ``only=False`` keeps undesirable rows only (NPO), ``only=True`` desirable rows only.
    """
    _check(prompts, responses, rewards)
    rows = {"prompt": [], "response": [], "label": []}
    for p, resps, scores in zip(prompts, responses, rewards):
        s = np.asarray(scores, dtype=float)
        cut = s.mean() if threshold is None else threshold
        for r, v in zip(resps, s):
            if threshold is None and abs(v - cut) < 1e-12:
                continue
            label = bool(v > cut)
            if only is not None and label != only:
                continue
            rows["prompt"].append(p)
            rows["response"].append(r)
            rows["label"].append(label)
    return pa.table(rows)
