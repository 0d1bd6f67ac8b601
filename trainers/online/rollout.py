"""Rollouts of on-policy methods: sample K responses per prompt through the flow's generator,
score them with the reward function, and evaluate a policy (mean reward, KL to a reference),
counting what was spent.

Sampling goes through a ``schemas.generator.Generator`` built by the flow's
``PolicyGeneratorFactory`` around the live policy: trainers never construct backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from alignflow.schemas.generator import Generation, Messages, SamplingParams
from alignflow.trainers.encoding import encode_samples, sequence_kl


@dataclass
class Spend:
    """Counters every online method reports: sampled responses and judge/reward calls (items)."""

    generations: int = 0
    judge_calls: int = 0

    def add(self, generations: int = 0, judge_calls: int = 0) -> None:
        self.generations += generations
        self.judge_calls += judge_calls


def sample(generator: Any, prompts: Sequence[Messages], k: int, sampling: SamplingParams,
           spend: Spend | None = None) -> list[list[Generation]]:
    """``k`` samples per prompt from ``generator``; counts them in ``spend``."""
    out = generator.generate(list(prompts), n=k, sampling=sampling)
    if spend is not None:
        spend.add(generations=sum(len(g) for g in out))
    return out


def finished_flags(gens: Sequence[Generation], max_new_tokens: int) -> list[bool]:
    """A sample that used the whole token budget was cut off: it gets no eos when re-encoded."""
    return [g.n_tokens < max_new_tokens for g in gens]


def score(reward_fn: Any, prompts: Sequence[Messages], responses: Sequence[str],
          spend: Spend | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Rewards as a float32 tensor ``[N]`` on ``device`` (default CPU); counts ``N`` judge calls.

    A reward function may return a list, an array or a tensor on any device."""
    if spend is not None:
        spend.add(judge_calls=len(responses))
    rewards = reward_fn(list(prompts), list(responses))
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to(device=device or "cpu", dtype=torch.float32).reshape(-1)
    return torch.as_tensor(list(rewards), dtype=torch.float32, device=device)


def eval_sampling_of(sampling: SamplingParams, seed: int) -> SamplingParams:
    """Evaluation sampling with a FIXED seed: before/after comparisons then use the same random
    numbers (common random numbers), so their difference has far less noise."""
    import dataclasses

    return sampling if sampling.seed is not None else dataclasses.replace(sampling, seed=10_000 + seed)


@torch.no_grad()
def evaluate(make_generator: Any, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Messages],
             reward_fn: Any, sampling: SamplingParams, ref: torch.nn.Module | None = None,
             k: int = 1) -> dict:
    """Mean reward of ``k`` samples per prompt (and mean KL to ``ref`` when given).

    Evaluation spend is not counted in the training budget."""
    was_training = model.training
    model.eval()
    gens = make_generator(model, tokenizer).generate(list(prompts), n=k, sampling=sampling)
    flat_p = [p for p, g in zip(prompts, gens) for _ in g]
    flat_g = [x for g in gens for x in g]
    rewards = score(reward_fn, flat_p, [g.text for g in flat_g])
    out = {"reward": float(rewards.mean()), "rewards": rewards.tolist(), "responses": [g.text for g in flat_g]}
    if ref is not None:
        batch = encode_samples(tokenizer, flat_p, [g.text for g in flat_g],
                               finished_flags(flat_g, sampling.max_new_tokens))
        out["kl"] = float(sequence_kl(model, ref, batch).mean())
    model.train(was_training)
    return out
