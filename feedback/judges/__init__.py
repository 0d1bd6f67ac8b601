"""Judges: pairwise (position-debiased, RLAIF), pointwise rubric (self-rewarding), listwise
(permutation-debiased), reward model, function (verifier); metrics of feedback quality."""

from alignflow.feedback.judges.listwise import ListwiseJudge
from alignflow.feedback.judges.metrics import agreement, length_bias, position_consistency, win_rate
from alignflow.feedback.judges.pairwise import PairwiseJudge, PairwiseJudgement
from alignflow.feedback.judges.pointwise import FunctionJudge, RubricJudge
from alignflow.feedback.judges.scoring import PrefixCachedScorer, make_scorer
from alignflow.feedback.judges.templates import ListwiseTemplate, PairExemplar, PairwiseTemplate, RubricTemplate, quote

__all__ = [
    "PairwiseJudge", "PairwiseJudgement", "RubricJudge", "FunctionJudge", "ListwiseJudge", "RewardModelJudge",
    "PrefixCachedScorer", "make_scorer", "PairwiseTemplate", "PairExemplar", "RubricTemplate",
    "ListwiseTemplate", "quote", "agreement", "length_bias", "position_consistency", "win_rate",
]


def __getattr__(name):  # the reward-model judge imports torch/transformers: load it on use
    if name == "RewardModelJudge":
        from alignflow.feedback.judges.reward_model import RewardModelJudge

        return RewardModelJudge
    raise AttributeError(name)
