"""Evaluation fine-tuning (EFT) data: teach a model to be its own rubric judge (survey 3.5.1).

Self-rewarding starts from a seed model fine-tuned on instruction-following data (IFT) and on
evaluation data (EFT): judge prompts (the rubric, the request, a response) whose target is the
score a trusted rater gave that response. After EFT the model's own score-token probabilities
are a usable reward, so it can rank its samples (``RubricJudge``) round after round.

``evaluation_examples`` builds those (judge prompt, score) pairs from any scored samples, e.g.
a verifier's rewards in [0, 1] or human ratings on another scale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignflow.feedback.judges.templates import RubricTemplate, conversation_text
from alignflow.schemas.generator import Messages


def score_tokens(rewards: Sequence[float], scores: Sequence[str], low: float = 0.0, high: float = 1.0) -> list[str]:
    """Map rewards on [low, high] linearly onto the rubric's score tokens (nearest one, halves
    round up).

    rewards [N] -> N score tokens; rewards outside the range are clipped to it.
    """
    if high <= low:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    r = np.clip((np.asarray(rewards, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    index = np.floor(r * (len(scores) - 1) + 0.5).astype(np.int64)
    return [scores[i] for i in index]


def evaluation_examples(prompts: Sequence[Messages | str], responses: Sequence[str], rewards: Sequence[float],
                        template: RubricTemplate | None = None, low: float = 0.0,
                        high: float = 1.0) -> list[tuple[Messages, str]]:
    """(judge prompt messages, target score token) per scored response: ``sft`` examples.

    The judge prompt is exactly what ``RubricJudge`` will show the model (same template, same
    quoting of the candidate), so the score read at judging time is the one trained here.
    """
    if not len(prompts) == len(responses) == len(rewards):
        raise ValueError(f"prompts, responses and rewards differ in length: "
                         f"{len(prompts)}, {len(responses)}, {len(rewards)}")
    template = template or RubricTemplate()
    targets = score_tokens(rewards, template.scores, low, high)
    return [(template.messages(conversation_text(p), r), template.answer_prefix + t)
            for p, r, t in zip(prompts, responses, targets)]
