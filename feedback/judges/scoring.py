"""How judges read log-probs of answer tokens from a generator.

``make_scorer(generator)`` returns an object with
``score_batch(prompts, continuations) -> list[list[float]]`` (summed log-probs of each
continuation after the chat-templated prompt):

* for an in-process transformers model (a generator exposing ``.model`` and ``.tokenizer``):
  ``PrefixCachedScorer``, which computes the key/value cache of the token prefix shared by a
  batch (a judge's preamble, few-shot exemplars) ONCE, keeps it across batches, and runs only
  the suffixes; single-token continuations (a judge's "1"/"2", a rubric's "0".."5") all come
  from one forward pass of their prompt (the next-token distribution at its last position);
* otherwise the generator's own ``score_batch`` (vLLM, OpenAI-compatible servers) or a loop over
  its ``score``.

A backend without log-probs raises ``NotImplementedError`` (``LogprobsUnavailable`` of the OpenAI
backend is one); judges take that as the signal to generate a verdict and parse it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Protocol, Sequence

from schemas.generator import Messages


class Scorer(Protocol):
    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        ...


class GeneratorScorer:
    """Scores through the generator's own ``score_batch`` or ``score``."""

    def __init__(self, generator: Any):
        self.generator = generator

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        batch = getattr(self.generator, "score_batch", None)
        if batch is None:
            return [list(map(float, self.generator.score(p, list(c)))) for p, c in zip(prompts, continuations)]
        # backends take flat (prompt, continuation) pairs, as ``HFGenerator.score_batch``
        flat_p = [p for p, cs in zip(prompts, continuations) for _ in cs]
        flat_c = [c for cs in continuations for c in cs]
        values = [float(v) for v in batch(flat_p, flat_c)]
        out, k = [], 0
        for cs in continuations:
            out.append(values[k: k + len(cs)])
            k += len(cs)
        return out


def render_chat(tokenizer: Any, messages: Messages) -> str:
    """The prompt text a chat model continues: the tokenizer's chat template with the generation
    prompt, or a plain ``role: content`` transcript when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for other in rows[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


class PrefixCachedScorer:
    """Log-probs of continuations from a causal LM, sharing the computation of common prefixes.

    Rows: one per distinct model input. A single-token continuation needs no extra row (it is
    read from the next-token distribution after its prompt), so both answers of a judge prompt
    cost one row. Rows are sorted by length and run ``batch_size`` at a time; per batch:

    1. level 1: the token prefix P common to all rows (a judge's preamble and exemplars) gets
       its key/value cache ``[layers][1, heads, P, d]`` computed once and kept for later
       batches with the same prefix (every batch of a judging run);
    2. level 2: runs of adjacent rows sharing more than that (the two orders of one pair share
       the request) form groups; each group's extra shared tokens run once ``[G, M]``;
    3. only each row's own suffix runs ``[B, S]`` (right-padded, position ids continuing its
       prefix, attention mask ``[B, P + M + S]`` hiding other groups' slots), and
       ``log_softmax`` is taken only where continuation tokens are predicted.

    Equal to scoring each full sequence from scratch up to float rounding (tested).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, min_prefix: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.min_prefix = min_prefix
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._prefix_ids: tuple[int, ...] | None = None
        self._prefix_cache: Any = None
        self.prefix_hits = 0  # batches that reused a cached prefix (for tests and benches)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _plan(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]):
        """Rows to run and, per continuation, which row positions predict which tokens.

        All "prompt + continuation" texts are tokenized in ONE batched call with offsets; the
        continuation starts at the first token not wholly inside the prompt text (a token that
        a BPE merge stretches across the boundary counts as continuation)."""
        prompt_texts = [render_chat(self.tokenizer, m) for m in prompts]
        keys = [(i, j) for i, conts in enumerate(continuations) for j in range(len(conts))]
        fulls = [prompt_texts[i] + continuations[i][j] for i, j in keys]
        starts: list[int]
        try:
            enc = self.tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=True)
            ids_all = [list(x) for x in enc["input_ids"]]
            starts = []
            for (i, _), offsets in zip(keys, enc["offset_mapping"]):
                cut = len(prompt_texts[i])
                starts.append(next((t for t, (_, e) in enumerate(offsets) if e > cut), len(offsets)))
        except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: no offsets
            ids_all = [self._ids(f) for f in fulls]
            p_ids = {i: self._ids(prompt_texts[i]) for i in {i for i, _ in keys}}
            starts = [_common_prefix_len([full, p_ids[i]]) for (i, _), full in zip(keys, ids_all)]
        rows: dict[tuple[int, ...], int] = {}
        targets = []  # (item, cont, row, [(position, token), ...])
        for (i, j), full, start in zip(keys, ids_all, starts):
            if start == 0 or start >= len(full):
                raise ValueError(f"continuation {continuations[i][j]!r} adds no token after the prompt")
            # a one-token continuation reuses the prompt's row (same input)
            row = rows.setdefault(tuple(full[:-1]), len(rows))
            targets.append((i, j, row, [(t - 1, full[t]) for t in range(start, len(full))]))
        return list(rows), targets

    def _prefix(self, ids: tuple[int, ...]):
        import torch

        if self._prefix_ids == ids:
            self.prefix_hits += 1
            return self._prefix_cache
        out = self.model(torch.tensor([ids], device=self.model.device), use_cache=True)
        self._prefix_ids = ids
        self._prefix_cache = getattr(out, "cache", None) or out.past_key_values
        return self._prefix_cache

    def _groups(self, rows: list[tuple[int, ...]], P: int, limits: list[int]) -> tuple[list[int], list[int]]:
        """Second-level sharing: runs of consecutive rows whose common prefix extends at least
        ``min_prefix`` tokens beyond ``P`` form a group (e.g. the two orders of one judged pair
        share the request). Returns each row's group index and each group's prefix end L_g,
        capped so every row keeps at least one token and all its target positions after it."""
        runs: list[list[int]] = [[0]]
        for b in range(1, len(rows)):
            if _common_prefix_len([rows[runs[-1][0]], rows[b]]) - P >= self.min_prefix:
                runs[-1].append(b)
            else:
                runs.append([b])
        group_of = [g for g, run in enumerate(runs) for _ in run]
        ends = []
        for run in runs:
            lcp = _common_prefix_len([rows[i] for i in run]) if len(run) > 1 else P
            ends.append(max(P, min([lcp] + [limits[i] for i in run])))
        return group_of, ends

    def _row_logps(self, rows: list[tuple[int, ...]], wanted: list[list[tuple[int, int]]]) -> list[list[float]]:
        """Log-probs at (position, token) pairs of each row, with two levels of prefix sharing:
        the batch-wide prefix P (cached across calls) and per-group prefixes [P, L_g) computed
        once per group; then only each row's suffix [L_g, len) runs. Shapes: group pass
        [G, M] with M = max(L_g - P); suffix pass [B, S]; attention mask [B, P + M + S]."""
        import torch

        device = self.model.device
        limits = [min(len(r) - 1, min(pos for pos, _ in w)) for r, w in zip(rows, wanted)]
        P = min(_common_prefix_len(rows), min(limits))
        use_prefix = P >= self.min_prefix
        P = P if use_prefix else 0
        group_of, ends = self._groups(rows, P, limits) if use_prefix else (list(range(len(rows))), [0] * len(rows))
        G, B = len(ends), len(rows)
        M = max(e - P for e in ends) if use_prefix else 0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        cache = None
        if use_prefix:
            cache = copy.deepcopy(self._prefix(rows[0][:P]))
            cache.batch_select_indices(torch.zeros(G if M else B, dtype=torch.long, device=device))
        if M:  # level 2: each group's shared tokens, once per group
            firsts = [group_of.index(g) for g in range(G)]
            g_ids = torch.full((G, M), pad, dtype=torch.long)
            g_mask = torch.zeros((G, P + M), dtype=torch.long)
            g_mask[:, :P] = 1
            for g, b in enumerate(firsts):
                n = ends[g] - P
                g_ids[g, :n] = torch.tensor(rows[b][P: ends[g]])
                g_mask[g, P: P + n] = 1
            self.model(g_ids.to(device), attention_mask=g_mask.to(device),
                       position_ids=(P + torch.arange(M)).expand(G, M).to(device), use_cache=True,
                       **{self._cache_kw: cache})
            cache.batch_select_indices(torch.tensor(group_of, device=device))
        starts = [ends[group_of[b]] if use_prefix else 0 for b in range(B)]
        S = max(len(r) - s for r, s in zip(rows, starts))
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros((B, P + M + S), dtype=torch.long)
        positions = torch.zeros((B, S), dtype=torch.long)
        mask[:, :P] = 1
        for b, (r, s) in enumerate(zip(rows, starts)):
            input_ids[b, : len(r) - s] = torch.tensor(r[s:])
            mask[b, P: s] = 1  # its group's prefix (the rest of the M slots is another group's padding)
            mask[b, P + M: P + M + len(r) - s] = 1
            positions[b] = s + torch.arange(S)
        kwargs = {"attention_mask": mask.to(device), "position_ids": positions.to(device),
                  "use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        logits = self.model(input_ids.to(device), **kwargs).logits  # [B, S, V]
        b_idx = torch.tensor([b for b, w in enumerate(wanted) for _ in w], device=device)
        s_idx = torch.tensor([pos - starts[b] for b, w in enumerate(wanted) for pos, _ in w], device=device)
        tok = torch.tensor([t for w in wanted for _, t in w], device=device)
        picked = logits[b_idx, s_idx].float().log_softmax(-1).gather(-1, tok[:, None])[:, 0].tolist()
        out, k = [], 0
        for w in wanted:
            out.append(picked[k: k + len(w)])
            k += len(w)
        return out

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]],
                    progress: Callable[[int], None] | None = None) -> list[list[float]]:
        import torch

        rows, targets = self._plan(prompts, continuations)
        by_row: dict[int, list[tuple[int, int]]] = {}
        for _, _, row, pairs in targets:
            by_row.setdefault(row, []).extend(pairs)
        row_values: dict[tuple[int, int], float] = {}
        with torch.inference_mode():
            order = sorted(range(len(rows)), key=lambda r: len(rows[r]))  # similar lengths: less padding
            for start in range(0, len(rows), self.batch_size):
                chunk = order[start: start + self.batch_size]
                wanted = [sorted(set(by_row[r])) for r in chunk]
                values = self._row_logps([rows[r] for r in chunk], wanted)
                for r, w, v in zip(chunk, wanted, values):
                    for pt, lp in zip(w, v):
                        row_values[(r, *pt)] = lp
                if progress:
                    progress(len(chunk))
        result = [[0.0] * len(c) for c in continuations]
        for i, j, row, pairs in targets:
            result[i][j] = float(sum(row_values[(row, *pt)] for pt in pairs))
        return result


def make_scorer(generator: Any, batch_size: int | None = None) -> Scorer:
    """The fastest scorer a generator allows (see the module docstring)."""
    if generator is None:
        raise ValueError("a judge that reads log-probs needs a generator")
    if hasattr(generator, "score_batch") and not (hasattr(generator, "model") and hasattr(generator, "tokenizer")):
        return GeneratorScorer(generator)
    model, tokenizer = getattr(generator, "model", None), getattr(generator, "tokenizer", None)
    if model is not None and tokenizer is not None and hasattr(model, "forward") and hasattr(tokenizer, "apply_chat_template"):
        return PrefixCachedScorer(model, tokenizer, batch_size=batch_size or getattr(generator, "batch_size", 64) or 64)
    return GeneratorScorer(generator)


class LLMJudgeBase:
    """What the LLM judges share: a lazily built scorer over their generator, and its provenance."""

    generator: Any
    batch_size: int
    _scorer: "Scorer | None"

    @property
    def scorer(self) -> "Scorer":
        if self._scorer is None:
            self._scorer = make_scorer(self.generator, self.batch_size)
        return self._scorer

    def generator_provenance(self) -> Any:
        gen = getattr(self.generator, "provenance", None)
        return gen() if callable(gen) else getattr(self.generator, "name", type(self.generator).__name__)
