"""A pairwise preference model P(y > y' | x) with both responses in one input (survey 3.11).

Nash methods (Nash-MD, SPPO, DNO) need a general preference function rather than a pointwise
BT reward (which cannot express intransitive preferences). The model reads::

    chat(x) + "[A]" + y + "[B]" + y' + eos   ->   logit f(x, y, y')

on a one-label ``AutoModelForSequenceClassification`` head and is trained with binary
cross-entropy on BOTH orders of every strictly ordered pair (label 1 for (winner, loser), 0 for
(loser, winner)). At inference the two orders are averaged (position debiasing)::

    P(y > y' | x) = ( sigmoid(f(x, y, y')) + 1 - sigmoid(f(x, y', y)) ) / 2

so P(y > y') + P(y' > y) = 1 exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignflow.trainers import encoding, modeling
from alignflow.trainers.reward_model import RankedExample

SEP_A, SEP_B = "[A]", "[B]"


def pair_text(a: str, b: str) -> str:
    return f"{SEP_A}{a}{SEP_B}{b}"


def pair_logits(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    """``f(x, a, b)`` for aligned lists: ``[N]`` on the model's device."""
    batch = encoding.encode_samples(tokenizer, [encoding.as_messages(p) for p in prompts],
                              [pair_text(x, y) for x, y in zip(a, b)]).to(modeling.device_of(model))
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float()


def preference_probs(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], a: Sequence[str],
                     b: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Position-debiased P(a > b | x): ``[N]`` in [0, 1]."""
    out = []
    with torch.no_grad():
        for s in range(0, len(a), batch_size):
            p, x, y = prompts[s:s + batch_size], a[s:s + batch_size], b[s:s + batch_size]
            ab = torch.sigmoid(pair_logits(model, tokenizer, p, x, y))
            ba = torch.sigmoid(pair_logits(model, tokenizer, p, y, x))
            out.append((ab + 1.0 - ba) / 2.0)
    return torch.cat(out) if out else torch.zeros(0, device=modeling.device_of(model))


def ordered_pairs(examples: Sequence[RankedExample]) -> list[tuple[Any, str, str]]:
    """All strictly ordered (prompt, winner, loser) pairs of the examples."""
    out = []
    for e in examples:
        for i, (ri, si) in enumerate(zip(e.responses, e.scores)):
            for j, (rj, sj) in enumerate(zip(e.responses, e.scores)):
                if si > sj:
                    out.append((e.prompt, ri, rj))
    return out


def preference_accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[RankedExample]) -> float:
    """Share of held-out ordered pairs with P(winner > loser) > 1/2 (exactly 1/2 counts half)."""
    pairs = ordered_pairs(examples)
    if not pairs:
        return float("nan")
    model.eval()
    p = preference_probs(model, tokenizer, [x[0] for x in pairs], [x[1] for x in pairs], [x[2] for x in pairs])
    return float(((p > 0.5).float() + 0.5 * (p == 0.5).float()).mean())


@dataclass
class PreferenceModelConfig:
    epochs: int = 3
    batch_size: int = 32  # pairs (each seen in both orders)
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0


def train_preference_model(model: nn.Module, tokenizer: Any, train: Sequence[RankedExample],
                           eval_examples: Sequence[RankedExample] = (),
                           config: PreferenceModelConfig | None = None) -> dict:
    """Fit ``model`` with BCE on both orders; returns metrics (``eval_accuracy`` before/after)."""
    cfg = config or PreferenceModelConfig()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = ordered_pairs(train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    before = preference_accuracy(model, tokenizer, eval_examples) if eval_examples else float("nan")
    last = float("nan")
    for _ in range(cfg.epochs):
        model.train()
        for chunk in torch.randperm(len(pairs), generator=gen).split(cfg.batch_size):
            sel = [pairs[i] for i in chunk.tolist()]
            prompts = [x[0] for x in sel] * 2
            first = [x[1] for x in sel] + [x[2] for x in sel]
            second = [x[2] for x in sel] + [x[1] for x in sel]
            logits = pair_logits(model, tokenizer, prompts, first, second)
            labels = torch.cat([torch.ones(len(sel)), torch.zeros(len(sel))]).to(logits.device)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            modeling.step(optimizer, loss, params, cfg.max_grad_norm)
            last = loss.item()
    model.eval()
    after = preference_accuracy(model, tokenizer, eval_examples) if eval_examples else float("nan")
    return {"train_loss": last, "eval_accuracy_before": before, "eval_accuracy": after,
            "pairs": len(pairs), "wall_s": time.perf_counter() - t0}


class PreferenceModelFn:
    """A ``schemas.online.PreferenceFn`` over a trained preference model."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        self.model, self.tokenizer = model.eval(), tokenizer

    def __call__(self, prompts: Sequence[Any], responses_a: Sequence[str], responses_b: Sequence[str]) -> list[float]:
        return preference_probs(self.model, self.tokenizer, list(prompts), list(responses_a), list(responses_b)).tolist()
