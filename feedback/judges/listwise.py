"""Listwise judge: ranks K responses of one prompt, debiased over permutations.

For each of ``n_permutations`` orders pi (the identity, the reversal, then seeded random
shuffles), the judge sees the responses in that order and gives, from the log-probs of the
answer tokens "1".."K", the probability that each shown position is the best::

    q_pi(k) = softmax_k(log p(str(k) | prompt shown in order pi))

Mapped back to the original responses and averaged over orders, this is each response's
debiased probability of being the best (the first-choice probability of a Plackett-Luce
ranking), used as the listwise ``scores`` (higher is better)::

    score(j) = mean over pi of q_pi(pi^-1(j))

Without log-probs the judge generates a full ranking ("2 > 1 > 3") per order and scores each
response by its mean Borda count (K - 1 for the best ... 0 for the worst), normalised to [0, 1].
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from alignflow.feedback.judges.scoring import LLMJudgeBase, Scorer
from alignflow.feedback.judges.templates import ListwiseTemplate, conversation_text, parse_ranking
from alignflow.schemas.generator import Messages, SamplingParams


def permutations_for(k: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` distinct orders of ``k`` items when possible: identity, reversal, then random."""
    perms = [np.arange(k)]
    if n > 1 and k > 1:
        perms.append(np.arange(k)[::-1].copy())
    seen = {tuple(p) for p in perms}
    tries = 0
    while len(perms) < n and tries < 50 * n:
        p = rng.permutation(k)
        tries += 1
        if tuple(p) not in seen:
            seen.add(tuple(p))
            perms.append(p)
    return perms[:max(1, n)]


def softmax_rows(lp: np.ndarray) -> np.ndarray:
    lp = np.asarray(lp, dtype=np.float64)
    m = np.max(np.where(np.isneginf(lp), -1e300, lp), axis=-1, keepdims=True)
    w = np.exp(lp - m)
    s = w.sum(axis=-1, keepdims=True)
    return np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / lp.shape[-1])


class ListwiseJudge(LLMJudgeBase):
    name = "listwise-llm"

    def __init__(self, generator: Any, template: ListwiseTemplate | None = None, *, n_permutations: int = 4,
                 mode: str = "auto", seed: int = 0, batch_size: int = 64, rank_tokens: int = 32,
                 scorer: Scorer | None = None):
        self.generator = generator
        self.template = template or ListwiseTemplate()
        self.n_permutations = n_permutations
        self.mode = mode
        self.seed = seed
        self.batch_size = batch_size
        self.rank_tokens = rank_tokens
        self._scorer = scorer
        self.last_method: str | None = None

    def config(self) -> dict:
        return {"judge": self.name, "mode": self.mode, "n_permutations": self.n_permutations, "seed": self.seed,
                "generator": self.generator_provenance()}

    def rank(self, prompts: Sequence[Messages | str], response_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        """Debiased scores (one list per prompt, aligned with its responses)."""
        rng = np.random.default_rng(self.seed)
        self.template = self.quoting(self.template)
        fitter = self.fitter()
        fitted = [fitter.fit(lambda pieces: self.template.messages(pieces[0], pieces[1:], rank=True),
                             [conversation_text(p), *rs], self.rank_tokens)
                  for p, rs in zip(prompts, response_lists)]
        self.last_truncated = fitter.truncated
        texts = [f[0] for f in fitted]
        response_lists = [f[1:] for f in fitted]
        jobs = []  # (item, permutation)
        for i, responses in enumerate(response_lists):
            k = len(responses)
            if k > 9:
                raise ValueError(f"listwise judge: at most 9 responses per prompt (row {i} has {k})")
            for perm in permutations_for(k, self.n_permutations, rng):
                jobs.append((i, perm))
        scores = [np.zeros(len(r)) for r in response_lists]
        counts = np.zeros(len(response_lists))
        if not jobs:
            return [s.tolist() for s in scores]
        shown = [[response_lists[i][j] for j in perm] for i, perm in jobs]
        if self.mode != "generate":
            try:
                msgs = [self.template.messages(texts[i], s) for (i, _), s in zip(jobs, shown)]
                conts = [self.template.continuations(len(s)) for s in shown]
                lps = self.scorer.score_batch(msgs, conts)
                for (i, perm), lp in zip(jobs, lps):
                    q = softmax_rows(np.asarray(lp)[None])[0]
                    scores[i][perm] += q  # shown position k holds original response perm[k]
                    counts[i] += 1
                self.last_method = "logprobs"
                return [(s / max(c, 1)).tolist() for s, c in zip(scores, counts)]
            except NotImplementedError:
                if self.mode == "logprobs":
                    raise
        self.last_method = "generate"
        msgs = [self.template.messages(texts[i], s, rank=True) for (i, _), s in zip(jobs, shown)]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.rank_tokens)
        answers = []
        for s in range(0, len(msgs), self.batch_size):
            answers.extend(g[0].text for g in self.generator.generate(msgs[s: s + self.batch_size], 1, greedy))
        for (i, perm), text in zip(jobs, answers):
            k = len(perm)
            order = parse_ranking(text, k)
            borda = np.full(k, 0.5) if order is None or k == 1 else (k - 1 - np.argsort(order)) / (k - 1)
            scores[i][perm] += borda  # borda[shown position] -> original index perm[pos]
            counts[i] += 1
        return [(s / max(c, 1)).tolist() for s, c in zip(scores, counts)]
