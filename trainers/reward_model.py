"""Bradley-Terry reward model (survey eq. 1, InstructGPT) on a sequence-classification head.

    L_RM = -1/C(K,2) E_{(x, y_w, y_l)} log sigma(r(x, y_w) - r(x, y_l) - m)           (1)

A prompt with K ranked responses contributes all of its C(K,2) strictly ordered pairs, in ONE
batch and from ONE forward pass over its K responses (InstructGPT trained the comparisons of a
prompt together to avoid over-fitting to correlated pairs). The loss is the registry's ``bt``
(``trainers.losses``) on ``rewards [B,K]``, ``scores [B,K]``, ``mask [B,K]``; ``margin`` is the
optional required gap m (Llama-2 style). Pairwise data are the K = 2 case (scores 1 / 0, with
the row's ``margin`` column when present).

``r(x, y)`` is ``AutoModelForSequenceClassification`` with one label, reading the last
non-padding token of ``chat(x) + y + eos``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from alignflow.trainers import encoding, modeling
from alignflow.trainers.losses import compute_loss


@dataclass
class RankedExample:
    """One prompt with K >= 2 responses and their scores (higher is better; ties allowed)."""

    prompt: list[dict]
    responses: list[str]
    scores: list[float]
    margin: float | None = None  # pairwise data's margin column (None = the config's margin)


def examples_from_table(table: Any) -> list[RankedExample]:
    """``RankedExample`` rows from a ``pairwise`` or ``listwise`` Arrow table of the store."""
    cols = set(table.column_names)
    data = table.to_pydict()
    out: list[RankedExample] = []
    if {"chosen", "rejected"} <= cols:
        margins = data.get("margin") or [None] * table.num_rows
        for p, c, r, m in zip(data["prompt"], data["chosen"], data["rejected"], margins):
            out.append(RankedExample(p, [c, r], [1.0, 0.0], None if m is None or math.isnan(m) else float(m)))
    elif {"responses", "scores"} <= cols:
        for p, rs, ss in zip(data["prompt"], data["responses"], data["scores"]):
            out.append(RankedExample(p, list(rs), [float(s) for s in ss]))
    else:
        raise ValueError(f"reward model needs a pairwise or listwise dataset; columns are {sorted(cols)}")
    return out


def make_reward_model(model_or_path: Any, tokenizer: Any) -> nn.Module:
    """A one-label ``AutoModelForSequenceClassification`` (from a causal-LM checkpoint: new head)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_or_path), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _encode_rows(tokenizer: Any, prompts: Sequence[list[dict]], responses: Sequence[str],
                 device: torch.device | str | None = None) -> dict:
    batch = encoding.encode_samples(tokenizer, [encoding.as_messages(p) for p in prompts], responses)
    if device is not None:
        batch = batch.to(device)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def reward_scores(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str],
                  batch_size: int = 64) -> torch.Tensor:
    """``r(x, y)`` for aligned prompts and responses: float ``[N]`` on the model's device (no gradient)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(responses), batch_size):
            enc = _encode_rows(tokenizer, prompts[s:s + batch_size], responses[s:s + batch_size], modeling.device_of(model))
            out.append(model(**enc).logits[:, 0].float())
    return torch.cat(out) if out else torch.zeros(0, device=modeling.device_of(model))


def listwise_rewards(model: nn.Module, tokenizer: Any, examples: Sequence[RankedExample]) -> dict:
    """One forward over every response of the examples; returns ``rewards``, ``scores``,
    ``mask`` ``[B, K_max]`` (the ``bt`` loss's listwise batch), on the model's device."""
    k_max = max(len(e.responses) for e in examples)
    flat_p = [e.prompt for e in examples for _ in e.responses]
    flat_r = [r for e in examples for r in e.responses]
    flat = model(**_encode_rows(tokenizer, flat_p, flat_r, modeling.device_of(model))).logits[:, 0].float()
    rewards = torch.zeros(len(examples), k_max, dtype=flat.dtype, device=flat.device)
    scores = torch.zeros(len(examples), k_max)
    mask = torch.zeros(len(examples), k_max, dtype=torch.bool)
    pos = 0
    rows, cols = [], []
    for b, e in enumerate(examples):
        for k, s in enumerate(e.scores):
            rows.append(b)
            cols.append(k)
            scores[b, k] = s
            mask[b, k] = True
        pos += len(e.responses)
    index = (torch.tensor(rows, device=flat.device), torch.tensor(cols, device=flat.device))
    rewards = rewards.index_put(index, flat)
    # scores and mask are filled on the host (per-element writes) and moved once
    return {"rewards": rewards, "scores": scores.to(flat.device), "mask": mask.to(flat.device)}


def pairwise_accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[RankedExample]) -> float:
    """Share of strictly ordered held-out pairs (all C(K,2) of each prompt) ranked right by r;
    a reward tie counts one half."""
    model.eval()
    right, total = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), 32):
            chunk = examples[s:s + 32]
            b = listwise_rewards(model, tokenizer, chunk)
            r, sc, m = b["rewards"], b["scores"], b["mask"]
            pair = (sc[:, :, None] > sc[:, None, :]) & m[:, :, None] & m[:, None, :]
            diff = r[:, :, None] - r[:, None, :]
            right += float(((diff > 0).float() + 0.5 * (diff == 0).float())[pair].sum())
            total += int(pair.sum())
    return right / total if total else float("nan")


@dataclass
class RewardModelConfig:
    epochs: int = 3
    prompts_per_batch: int = 16  # each brings all of its C(K,2) pairs
    lr: float = 1e-4
    margin: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    history: list = field(default_factory=list)


def train_reward_model(model: nn.Module, tokenizer: Any, train: Sequence[RankedExample],
                       eval_examples: Sequence[RankedExample] = (), config: RewardModelConfig | None = None) -> dict:
    """Fit ``model`` (one-label sequence classifier) with the ``bt`` loss; returns metrics
    (``train_loss``, ``eval_accuracy`` before and after, ``pairs``, ``wall_s``)."""
    cfg = config or RewardModelConfig()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    acc_before = pairwise_accuracy(model, tokenizer, eval_examples) if eval_examples else float("nan")
    last_loss = float("nan")
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        for s in range(0, len(order), cfg.prompts_per_batch):
            chunk = [train[i] for i in order[s:s + cfg.prompts_per_batch]]
            batch = listwise_rewards(model, tokenizer, chunk)
            margins = [e.margin for e in chunk]
            if any(m is not None for m in margins) and batch["rewards"].shape[1] == 2:
                # pairwise data with a margin column: the pairwise form of ``bt``
                pair_batch = {"chosen_rewards": batch["rewards"][:, 0], "rejected_rewards": batch["rewards"][:, 1],
                              "margin": torch.tensor([math.nan if m is None else m for m in margins],
                                                     device=batch["rewards"].device)}
                per_example = compute_loss("bt", pair_batch, margin=cfg.margin)
            else:
                per_example = compute_loss("bt", batch, margin=cfg.margin)
            loss = per_example.mean()
            modeling.step(optimizer, loss, params, cfg.max_grad_norm)
            last_loss = loss.item()
            cfg.history.append({"epoch": epoch, "loss": last_loss})
    model.eval()
    acc_after = pairwise_accuracy(model, tokenizer, eval_examples) if eval_examples else float("nan")
    pairs = sum(len(e.responses) * (len(e.responses) - 1) // 2 for e in train)
    return {"train_loss": last_loss, "eval_accuracy_before": acc_before, "eval_accuracy": acc_after,
            "pairs": pairs, "wall_s": time.perf_counter() - t0}
