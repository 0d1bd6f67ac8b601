"""Judges: pairwise (position-debiased, RLAIF), pointwise rubric (self-rewarding), listwise
(permutation-debiased), reward model, function (verifier); metrics of feedback quality."""

from feedback.judges.listwise import ListwiseJudge
from feedback.judges.metrics import agreement, length_bias, position_consistency, win_rate
from feedback.judges.pairwise import PairwiseJudge, PairwiseJudgement
from feedback.judges.pointwise import FunctionJudge, RubricJudge
from feedback.judges.scoring import PrefixCachedScorer, make_scorer
from feedback.judges.templates import ListwiseTemplate, PairExemplar, PairwiseTemplate, RubricTemplate, quote

__all__ = [
    "PairwiseJudge", "PairwiseJudgement", "RubricJudge", "FunctionJudge", "ListwiseJudge", "RewardModelJudge",
    "PrefixCachedScorer", "make_scorer", "PairwiseTemplate", "PairExemplar", "RubricTemplate",
    "ListwiseTemplate", "quote", "agreement", "length_bias", "position_consistency", "win_rate",
]


def __getattr__(name):  # the reward-model judge imports torch/transformers: load it on use
    if name == "RewardModelJudge":
        from feedback.judges.reward_model import RewardModelJudge

        return RewardModelJudge
    raise AttributeError(name)
