"""Pairwise LLM judge after RLAIF (survey 3.2.2), position-debiased.

For each pair (A, B) the judge prompt is built twice, A shown first and B shown first. In each
order the preference is the normalised probability of the two answer tokens::

    p_order = exp(l_first) / (exp(l_first) + exp(l_second)),   l = log p(answer token | prompt)

read from log-probs (``score``), never parsed from text when log-probs exist. With
``P_AB = p("1" | A first)`` and ``P_BA = p("2" | B first)`` (both: P(A better)),

    judge_prob = (P_AB + P_BA) / 2                                   (RLAIF's order averaging)
    verdict(p) = A if p > 0.5 + tie_band, B if p < 0.5 - tie_band, else tie
    judge_consistent = verdict(P_AB) == verdict(P_BA)

A backend without log-probs (``score`` raises ``NotImplementedError``) falls back to generating a
verdict in each order and parsing it (answer found: p = 1 or 0; none: 0.5).
With ``cot=True`` a first pass generates a rationale per order; the answer's log-probs are then
read after "rationale + cot ending" (RLAIF's two-step CoT labelling).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from alignflow.feedback.judges.scoring import LLMJudgeBase, Scorer
from alignflow.feedback.judges.templates import PairwiseTemplate, conversation_text, parse_choice
from alignflow.schemas.generator import Messages, SamplingParams

MODES = ("auto", "logprobs", "generate")


def two_way_prob(logp_first: np.ndarray, logp_second: np.ndarray) -> np.ndarray:
    """P(first answer) normalised over the two answers, stable; both -inf gives 0.5. Shapes [N]."""
    a = np.asarray(logp_first, dtype=np.float64)
    b = np.asarray(logp_second, dtype=np.float64)
    both_missing = np.isneginf(a) & np.isneginf(b)
    with np.errstate(invalid="ignore"):  # -inf - -inf is handled by both_missing
        diff = np.where(both_missing, 0.0, b - a)
    return np.where(both_missing, 0.5, 1.0 / (1.0 + np.exp(np.clip(diff, -700, 700))))


def verdicts(p: np.ndarray, tie_band: float) -> np.ndarray:
    """+1 (A better), -1 (B better) or 0 (tie, |p - 0.5| <= tie_band). Shape [N] int8."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(p > 0.5 + tie_band, 1, np.where(p < 0.5 - tie_band, -1, 0)).astype(np.int8)


@dataclass
class PairwiseJudgement:
    """Per-pair outcome arrays (length N) and the run's summary."""

    p_ab: np.ndarray  # P(A better) with A shown first
    p_ba: np.ndarray  # P(A better) with B shown first
    tie_band: float
    method: str  # "logprobs" or "generate"
    rationales: list[tuple[str, str]] | None = field(default=None, repr=False)
    truncated: int = 0  # pairs whose texts were cut to fit the judge's context (feedback.context)

    @property
    def judge_prob(self) -> np.ndarray:
        return (self.p_ab + self.p_ba) / 2.0

    @property
    def consistent(self) -> np.ndarray:
        return verdicts(self.p_ab, self.tie_band) == verdicts(self.p_ba, self.tie_band)

    @property
    def tie(self) -> np.ndarray:
        return verdicts(self.judge_prob, self.tie_band) == 0

    @property
    def position_consistency(self) -> float:
        """Share of pairs whose verdict does not change with the order shown (NaN if none)."""
        return float(self.consistent.mean()) if len(self.p_ab) else float("nan")

    def summary(self) -> dict:
        p = self.judge_prob
        return {"pairs": int(len(p)), "method": self.method,
                "position_consistency": self.position_consistency,
                "ties": int(self.tie.sum()), "mean_judge_prob": float(p.mean()) if len(p) else float("nan"),
                "truncated": self.truncated}


class PairwiseJudge(LLMJudgeBase):
    """Position-debiased pairwise judge over any ``Generator``.

    Args:
        generator: the judge model (any backend); used for ``score`` and, for CoT or the
            fallback, ``generate``.
        template: preamble, exemplars, ending and answer tokens.
        mode: "logprobs" (fail without log-probs), "generate" (always parse text), "auto"
            (log-probs, falling back to generation when the backend has none).
        cot: generate a rationale first (two passes per order).
        tie_band: half-width of the tie band around 0.5.
        scorer: overrides ``make_scorer(generator)`` (e.g. a shared ``PrefixCachedScorer``).
    """

    name = "pairwise-llm"

    def __init__(self, generator: Any, template: PairwiseTemplate | None = None, *, mode: str = "auto",
                 cot: bool = False, tie_band: float = 0.05, verdict_tokens: int = 16,
                 cot_tokens: int = 128, batch_size: int = 64, scorer: Scorer | None = None):
        if mode not in MODES:
            raise ValueError(f"judge mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.generator = generator
        self.template = template or PairwiseTemplate()
        self.mode = mode
        self.cot = cot
        self.tie_band = tie_band
        self.verdict_tokens = verdict_tokens
        self.cot_tokens = cot_tokens
        self.batch_size = batch_size
        self._scorer = scorer

    def config(self) -> dict:
        """Provenance of the judge (no secrets)."""
        return {"judge": self.name, "mode": self.mode, "cot": self.cot, "tie_band": self.tie_band,
                "answers": list(self.template.answers), "exemplars": len(self.template.exemplars),
                "generator": self.generator_provenance()}

    # -- both orders as one flat list: index 2*i is A-first, 2*i+1 is B-first ----------------
    def _ordered(self, prompts, responses_a, responses_b, criteria):
        """Both orders of each pair, the texts cut to fit the judge's context (feedback.context)."""
        texts = [conversation_text(p) for p in prompts]
        crit = list(criteria) if criteria is not None else [None] * len(texts)
        fitter = self.fitter()
        # room for the verdict (generated when the backend has no log-probs) and a rationale
        reserve = self.verdict_tokens + (self.cot_tokens + 64 if self.cot else 0)
        build = self.template.cot_messages if self.cot else self.template.messages
        out = []
        for t, a, b, c in zip(texts, responses_a, responses_b, crit):
            t, a, b = fitter.fit(lambda pieces, c=c: build(*pieces, c), (t, a, b), reserve)
            out.append((t, a, b, c))
            out.append((t, b, a, c))
        self.last_truncated = fitter.truncated
        return out

    def _rationales(self, ordered) -> list[str]:
        msgs = [self.template.cot_messages(*o) for o in ordered]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.cot_tokens)
        return [g[0].text for g in self._generate(msgs, greedy)]

    def _generate(self, messages: list[Messages], sampling: SamplingParams) -> list:
        out = []
        for start in range(0, len(messages), self.batch_size):
            out.extend(self.generator.generate(messages[start: start + self.batch_size], 1, sampling))
        return out

    def _by_logprobs(self, ordered, rationales, progress) -> np.ndarray:
        msgs = [self.template.messages(*o) for o in ordered]
        conts = [self.template.continuations(r) for r in (rationales or [None] * len(ordered))]
        kwargs = {"progress": progress} if progress is not None and _accepts_progress(self.scorer) else {}
        lps = np.asarray(self.scorer.score_batch(msgs, conts, **kwargs), dtype=np.float64)  # [2N, 2]
        return two_way_prob(lps[:, 0], lps[:, 1])  # P(first-shown better), per order

    def _by_generation(self, ordered, rationales) -> np.ndarray:
        if rationales is not None:  # CoT: the rationale already written, now the final answer
            msgs = [self.template.messages(*o)[:1] + [{"role": "assistant", "content": r},
                                                      {"role": "user", "content": self.template.cot_ending}]
                    for o, r in zip(ordered, rationales)]
        else:
            msgs = [self.template.messages(*o) for o in ordered]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.verdict_tokens)
        texts = [g[0].text for g in self._generate(msgs, greedy)]
        choice = [parse_choice(t, self.template.answers) for t in texts]
        return np.array([0.5 if c is None else (1.0 if c == 0 else 0.0) for c in choice])

    def judge(self, prompts: Sequence[Messages | str], responses_a: Sequence[str], responses_b: Sequence[str],
              criteria: Sequence[str | None] | None = None,
              progress: Callable[[int], None] | None = None) -> PairwiseJudgement:
        """Judge N pairs in both orders. ``criteria``: optional per-pair principle text."""
        if not (len(prompts) == len(responses_a) == len(responses_b)):
            raise ValueError("prompts, responses_a and responses_b must have the same length")
        self.template = self.quoting(self.template)
        ordered = self._ordered(prompts, responses_a, responses_b, criteria)
        rationales = self._rationales(ordered) if self.cot and ordered else None
        method = "generate" if self.mode == "generate" else "logprobs"
        p_first = None
        if not ordered:
            p_first = np.zeros(0)
        elif method == "logprobs":
            try:
                p_first = self._by_logprobs(ordered, rationales, progress)
            except NotImplementedError:
                if self.mode == "logprobs":
                    raise
                method = "generate"
        if p_first is None:
            p_first = self._by_generation(ordered, rationales)
        p_ab = p_first[0::2]
        p_ba = 1.0 - p_first[1::2]  # with B first, P(A better) = P(second shown better)
        pairs = None if rationales is None else list(zip(rationales[0::2], rationales[1::2]))
        return PairwiseJudgement(p_ab, p_ba, self.tie_band, method, pairs, truncated=self.last_truncated)


def _accepts_progress(scorer: Any) -> bool:
    import inspect

    try:
        return "progress" in inspect.signature(scorer.score_batch).parameters
    except (TypeError, ValueError):
        return False
