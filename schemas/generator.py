"""The generator interface shared by producers (feedback) and consumers (trainers).

Backends live in ``feedback.generation``; online trainers receive an object satisfying
``Generator`` from the flow that composes them, so ``trainers`` never imports ``feedback``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

Messages = list[dict]  # [{"role": ..., "content": ...}, ...]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Generation:
    """One sampled response: its text, token count and summed log-prob (None if unknown)."""

    text: str
    n_tokens: int
    logp: float | None = None
    token_logps: list[float] | None = field(default=None, repr=False)


@runtime_checkable
class Generator(Protocol):
    """What every generation backend provides."""

    name: str

    def generate(self, prompts: Sequence[Messages], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Generation]]:
        """``n`` responses for each prompt (chat template applied by the backend)."""
        ...

    def score(self, prompt: Messages, continuations: Sequence[str]) -> list[float]:
        """Summed log-probs of each continuation given the prompt (what judges read)."""
        ...
