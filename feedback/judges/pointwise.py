"""Pointwise judges: one score per (prompt, response).

* ``RubricJudge``: the self-rewarding additive 5-point rubric (survey 3.5.1). The score is the
  expectation over the score tokens' probabilities, normalised over the tokens "0".."5"::

      score = sum_k k * p_k / sum_k p_k,    p_k = exp(log p(token_k | judge prompt))

  (a smooth, tie-free score; the argmax digit would make most of K samples tie). Without
  log-probs it generates the total and parses it.
* ``FunctionJudge``: a Python verifier, e.g. the toy task's reward.
* ``RewardModelJudge``: a sequence-classification checkpoint (``reward_model.py``).

All have ``score(prompts, responses) -> np.ndarray [N]`` and ``config() -> dict``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from alignflow.feedback.judges.scoring import LLMJudgeBase, Scorer
from alignflow.feedback.judges.templates import RubricTemplate, conversation_text, parse_choice
from alignflow.schemas.generator import Messages, SamplingParams


def expected_score(logps: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """E[score] under softmax(logps) over the score tokens. logps [N, K] -> [N]."""
    lp = np.asarray(logps, dtype=np.float64)
    values = np.arange(lp.shape[1], dtype=np.float64) if values is None else np.asarray(values, dtype=np.float64)
    m = np.max(np.where(np.isneginf(lp), -1e300, lp), axis=1, keepdims=True)
    w = np.exp(lp - m)
    w_sum = w.sum(axis=1, keepdims=True)
    w = np.where(w_sum > 0, w / np.where(w_sum > 0, w_sum, 1.0), 1.0 / lp.shape[1])
    return w @ values


class RubricJudge(LLMJudgeBase):
    name = "rubric-llm"

    def __init__(self, generator: Any, template: RubricTemplate | None = None, *, mode: str = "auto",
                 cot: bool = False, batch_size: int = 64, verdict_tokens: int = 8, cot_tokens: int = 128,
                 scorer: Scorer | None = None):
        self.generator = generator
        self.template = template or RubricTemplate()
        self.mode = mode
        self.cot = cot
        self.batch_size = batch_size
        self.verdict_tokens = verdict_tokens
        self.cot_tokens = cot_tokens
        self._scorer = scorer
        self.last_method: str | None = None

    def config(self) -> dict:
        return {"judge": self.name, "mode": self.mode, "cot": self.cot, "scores": list(self.template.scores),
                "generator": self.generator_provenance()}

    def _generate(self, messages, max_new_tokens):
        greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
        out = []
        for s in range(0, len(messages), self.batch_size):
            out.extend(g[0].text for g in self.generator.generate(messages[s: s + self.batch_size], 1, greedy))
        return out

    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str]) -> np.ndarray:
        self.template = self.quoting(self.template)
        fitter = self.fitter()
        build = self.template.cot_messages if self.cot else self.template.messages
        reserve = self.verdict_tokens + (self.cot_tokens + 64 if self.cot else 0)
        fitted = [fitter.fit(lambda pieces: build(*pieces), (conversation_text(p), r), reserve)
                  for p, r in zip(prompts, responses)]
        self.last_truncated = fitter.truncated
        texts, responses = [t for t, _ in fitted], [r for _, r in fitted]
        rationales = None
        if self.cot and texts:
            rationales = self._generate([self.template.cot_messages(t, r) for t, r in zip(texts, responses)],
                                        self.cot_tokens)
        msgs = [self.template.messages(t, r) for t, r in zip(texts, responses)]
        values = np.array([float(s) for s in self.template.scores])
        if not msgs:
            return np.zeros(0)
        if self.mode != "generate":
            try:
                conts = [self.template.continuations(r) for r in (rationales or [None] * len(msgs))]
                self.last_method = "logprobs"
                return expected_score(np.asarray(self.scorer.score_batch(msgs, conts)), values)
            except NotImplementedError:
                if self.mode == "logprobs":
                    raise
        self.last_method = "generate"
        if rationales is not None:
            msgs = [m[:1] + [{"role": "assistant", "content": r}, {"role": "user", "content": self.template.ending}]
                    for m, r in zip(msgs, rationales)]
        answers = self._generate(msgs, self.verdict_tokens)
        picked = [parse_choice(a, self.template.scores) for a in answers]
        # an unparsable verdict gets the rubric's midpoint: no information either way
        return np.array([values.mean() if k is None else values[k] for k in picked])


class FunctionJudge:
    """A programmatic verifier as a judge.

    ``fn(prompt_text, response) -> float`` per row, or ``batch_fn(prompt_texts, responses) ->
    array`` for the whole batch (preferred: e.g. ``ToyTask.rewards``).
    """

    name = "function"

    def __init__(self, fn: Callable[[str, str], float] | None = None, *,
                 batch_fn: Callable[[Sequence[str], Sequence[str]], Sequence[float]] | None = None,
                 label: str | None = None):
        if fn is None and batch_fn is None:
            raise ValueError("FunctionJudge needs fn or batch_fn")
        self.fn, self.batch_fn = fn, batch_fn
        target = batch_fn or fn
        self.label = label or f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"

    @classmethod
    def from_task(cls, task: Any) -> "FunctionJudge":
        """A task object with ``rewards(prompts, responses)`` (the toy world's ``ToyTask``)."""
        return cls(batch_fn=task.rewards, label=f"{type(task).__module__}.{type(task).__name__}.rewards")

    def config(self) -> dict:
        return {"judge": self.name, "function": self.label}

    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str]) -> np.ndarray:
        texts = [conversation_text(p) for p in prompts]
        if self.batch_fn is not None:
            return np.asarray(self.batch_fn(texts, list(responses)), dtype=np.float64)
        return np.array([float(self.fn(t, r)) for t, r in zip(texts, responses)], dtype=np.float64)
