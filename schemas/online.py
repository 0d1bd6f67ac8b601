"""Interfaces that online trainers RECEIVE from the flow layer (they never build them).

``trainers`` may not import ``feedback``; a flow composes a generator backend and a judge from
``feedback`` and hands them to an online trainer through these protocols:

- ``PolicyGeneratorFactory``: wraps the LIVE policy (a model object being trained) in a
  ``schemas.generator.Generator`` so on-policy samples come from the current weights.
- ``RewardFn``: scalar rewards for (prompt, response) pairs -- a programmatic reward, a reward
  model ("distilled" RLAIF, survey 3.2.2) or a judge's score used directly ("direct" RLAIF).
- ``PreferenceFn``: P(a > b | x) for pairs of responses, position-debiased by the provider
  (a pairwise judge scoring both orders, or a pairwise preference model); used by SPPO,
  Nash-MD, DNO and the termination rule.
- ``JudgeFactory``: builds a ``RewardFn`` from the live policy (self-rewarding: the model judges
  its own samples with the additive 5-point rubric).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from alignflow.schemas.generator import Generator, Messages


@runtime_checkable
class RewardFn(Protocol):
    """Scalar reward per (prompt, response); higher is better. One call scores a whole batch."""

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        ...


@runtime_checkable
class PreferenceFn(Protocol):
    """P(responses_a[i] > responses_b[i] | prompts[i]) in [0, 1], position-debiased."""

    def __call__(self, prompts: Sequence[Messages], responses_a: Sequence[str],
                 responses_b: Sequence[str]) -> list[float]:
        ...


@runtime_checkable
class PolicyGeneratorFactory(Protocol):
    """Wrap a live model + tokenizer (updated in place by the trainer) as a ``Generator``."""

    def __call__(self, model: Any, tokenizer: Any) -> Generator:
        ...


@runtime_checkable
class JudgeFactory(Protocol):
    """Build a reward function whose judge is the given live model (self-rewarding, 3.5.1)."""

    def __call__(self, model: Any, tokenizer: Any) -> RewardFn:
        ...


@dataclass
class OnlineReport:
    """What an online run spent and achieved; written into the run report by the flow.

    ``history`` has one dict per round/step (reward, kl, ...); ``termination`` holds the
    stopping rule's decision and evidence (win counts, p-value, level) when one was applied.
    """

    method: str
    reward_before: float = float("nan")
    reward_after: float = float("nan")
    kl_to_ref: float = float("nan")
    generations: int = 0
    judge_calls: int = 0
    wall_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    termination: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reward_gain(self) -> float:
        return self.reward_after - self.reward_before

    def to_dict(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["reward_gain"] = self.reward_gain
        return out
