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
import functools
import inspect
from dataclasses import dataclass
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
    """Length of the longest token prefix shared by all ``rows``."""
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


def _expanded(cache: Any, n: int, device: Any) -> Any:
    """A copy of a batch-1 key/value cache for ``n`` rows. Layers holding plain ``keys`` /
    ``values`` tensors get broadcast views (no copy: the next forward's ``torch.cat`` writes the
    only copy); any other cache type falls back to ``batch_select_indices``."""
    import torch

    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(getattr(layer, "keys", None), torch.Tensor)
                      and isinstance(getattr(layer, "values", None), torch.Tensor) for layer in layers):
        out = copy.copy(cache)
        out.layers = [copy.copy(layer) for layer in layers]
        for layer in out.layers:
            layer.keys = layer.keys.expand(n, *layer.keys.shape[1:])
            layer.values = layer.values.expand(n, *layer.values.shape[1:])
        return out
    out = copy.deepcopy(cache)
    out.batch_select_indices(torch.zeros(n, dtype=torch.long, device=device))
    return out


def _plain_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain ``DynamicLayer`` (keys/values tensors
    [batch, heads, seq, d] grown along seq): the layout ``_FilledCache`` can preallocate."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A ``DynamicLayer`` over a preallocated buffer [batch, heads, total, d]: ``update``
        writes the new keys/values into the next free slots instead of concatenating (each
        slot is written once, no copy of the cached part per forward)."""

        def __init__(self, keys_buf, values_buf, filled: int):
            super().__init__()
            self.buffers = (keys_buf, values_buf)
            self.filled = filled
            self.keys, self.values = keys_buf[:, :, :filled], values_buf[:, :, :filled]
            self.device, self.is_initialized = keys_buf.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.filled + key_states.shape[-2]
            self.buffers[0][:, :, self.filled: end] = key_states
            self.buffers[1][:, :, self.filled: end] = value_states
            self.filled = end
            self.keys, self.values = self.buffers[0][:, :, :end], self.buffers[1][:, :, :end]
            return self.keys, self.values

    return BufferLayer


def _filled_cache(template: Any, parts: Sequence[Callable[[int], tuple[Any, Any]]], widths: Sequence[int],
                  rows: int, total: int) -> Any:
    """A cache shaped like ``template`` (plain layers) over new buffers [rows, heads, total, d]
    whose first sum(widths) slots are filled, part by part, with ``parts[i](layer) -> (keys,
    values)`` broadcastable to [rows, heads, widths[i], d]."""
    import torch

    layer_cls = _buffer_layer_class()
    out = copy.copy(template)
    out.layers = []
    for li, layer in enumerate(template.layers):
        _, heads, _, d_k = layer.keys.shape
        kb = torch.empty((rows, heads, total, d_k), dtype=layer.keys.dtype, device=layer.keys.device)
        vb = torch.empty((rows, heads, total, layer.values.shape[-1]), dtype=layer.values.dtype,
                         device=layer.values.device)
        at = 0
        for part, width in zip(parts, widths):
            k, v = part(li)
            kb[:, :, at: at + width] = k
            vb[:, :, at: at + width] = v
            at += width
        out.layers.append(layer_cls(kb, vb, at))
    return out


@dataclass
class _Group:
    """Rows (indices into the plan's rows) whose tokens [0, end) are identical: the batch-wide
    prefix [0, P) plus their own shared part [P, end) (the two orders of a judged pair share the
    request). A row alone forms a group with end = P."""

    rows: list[int]
    end: int


class PrefixCachedScorer:
    """Log-probs of continuations from a causal LM, sharing the computation of common prefixes.

    Rows: one per distinct model input (prompt tokens, then all but the last continuation
    token). A single-token continuation needs no extra row: it is read from the next-token
    distribution after its prompt, so both answers of a judge prompt cost one row; a row that
    is a prefix of another is read from the longer one. Three levels of sharing:

    1. the token prefix P common to ALL rows of a call (a judge's preamble and exemplars) gets
       its key/value cache ``[layers][1, heads, P, d]`` computed once, and kept for later calls
       with the same prefix;
    2. rows are sorted lexicographically, so rows sharing more than P are adjacent; runs
       sharing at least ``min_prefix`` more tokens form groups (the two orders of one pair share
       the request/conversation) whose shared part [P, L_g) runs once per group ``[G, M]``;
    3. only each row's own suffix [L_g, len) runs ``[B, S]``, left-padded so the positions
       that predict continuation tokens are the last columns: the LM head runs only there
       (``logits_to_keep``), position ids continue each row's prefix and the attention mask
       ``[B, P + M + S]`` hides other groups' slots and padding.

    Groups are batched by suffix length (``batch_size`` rows at most), so padding is small.
    Tokenization is that of ``HFGenerator.score_batch``: prompt tokens (chat template) followed
    by the continuation tokenized on its own. Equal to scoring each full sequence from scratch
    up to float rounding (tested, and printed by ``tests/bench/bench_judge.py``).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, min_prefix: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.min_prefix = min_prefix
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._prefix_ids: tuple[int, ...] | None = None
        self._prefix_cache: Any = None
        self.prefix_hits = 0  # calls that reused a cached prefix (for tests and benches)

    # -- planning -------------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        unique = list(dict.fromkeys(texts))
        ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        by_text = dict(zip(unique, ids))
        return [list(by_text[t]) for t in texts]

    def _plan(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]):
        """Rows to run and, per continuation, which row positions predict which tokens.

        Returns ``rows`` (token tuples) and ``targets``: (item, continuation, row,
        [(position, token), ...]) with position t predicting ``token`` (= the token at t + 1)."""
        prompt_ids = self._tokenize([render_chat(self.tokenizer, m) for m in prompts])
        unique_conts = list(dict.fromkeys(c for cs in continuations for c in cs))
        cont_ids = dict(zip(unique_conts, self._tokenize(unique_conts))) if unique_conts else {}
        rows: dict[tuple[int, ...], int] = {}
        targets = []
        for i, conts in enumerate(continuations):
            p = prompt_ids[i]
            for j, c in enumerate(conts):
                cids = cont_ids[c]
                if not cids:
                    raise ValueError(f"continuation {c!r} adds no token after the prompt")
                full = p + cids
                row = rows.setdefault(tuple(full[:-1]), len(rows))
                targets.append((i, j, row, [(t - 1, full[t]) for t in range(len(p), len(full))]))
        return list(rows), targets

    def _groups(self, rows: list[tuple[int, ...]], P: int, limits: list[int]) -> list[_Group]:
        """Level 2: rows sorted lexicographically; a run of neighbours sharing at least
        ``min_prefix`` tokens beyond ``P`` is a group (at most ``batch_size`` rows). A group's end
        is capped so every row keeps at least one token and all its target positions after it."""
        order = sorted(range(len(rows)), key=rows.__getitem__)
        runs: list[list[int]] = []
        shared: list[int] = []  # tokens the run's rows share
        for r in order:
            if runs and len(runs[-1]) < self.batch_size:
                lcp = min(shared[-1], _common_prefix_len([rows[runs[-1][-1]], rows[r]]))
                # join unless that would halve what the run already shares beyond P
                if lcp - P >= self.min_prefix and (len(runs[-1]) == 1 or 2 * (lcp - P) >= shared[-1] - P):
                    runs[-1].append(r)
                    shared[-1] = lcp
                    continue
            runs.append([r])
            shared.append(len(rows[r]))
        groups = []
        for run, lcp in zip(runs, shared):
            end = min([lcp] + [limits[r] for r in run]) if len(run) > 1 else P
            if end - P < self.min_prefix:  # not worth a group pass: each row runs from P
                groups.extend(_Group([r], P) for r in run)
            else:
                groups.append(_Group(run, end))
        return groups

    def _batches(self, rows: list[tuple[int, ...]], groups: list[_Group]) -> list[list[_Group]]:
        """Groups by suffix length (similar lengths: little padding), ``batch_size`` rows at most."""
        longest = {id(g): max(len(rows[r]) for r in g.rows) - g.end for g in groups}
        batches: list[list[_Group]] = []
        size = 0
        for g in sorted(groups, key=lambda g: (longest[id(g)], g.end)):
            if not batches or size + len(g.rows) > self.batch_size:
                batches.append([])
                size = 0
            batches[-1].append(g)
            size += len(g.rows)
        return batches

    # -- running --------------------------------------------------------------------------
    def _prefix(self, ids: tuple[int, ...]):
        import torch

        if self._prefix_ids == ids:
            self.prefix_hits += 1
            return self._prefix_cache
        out = self.model(torch.tensor([ids], device=self.model.device), use_cache=True,
                         **({self._keep_kw: 1} if self._keep_kw else {}))
        self._prefix_ids = ids
        self._prefix_cache = getattr(out, "cache", None) or out.past_key_values
        return self._prefix_cache

    def _forward(self, ids, mask, positions, cache, keep: int | None):
        kwargs = {"attention_mask": mask, "position_ids": positions, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if keep is not None and self._keep_kw:
            kwargs[self._keep_kw] = keep
        out = self.model(ids, **kwargs)
        logits = out.logits
        return (logits if keep is None else logits[:, -keep:]), (getattr(out, "cache", None) or out.past_key_values)

    def _run_batch(self, rows: list[tuple[int, ...]], wanted: list[list[tuple[int, int]]],
                   groups: list[_Group], P: int, prefix: Any) -> list[list[float]]:
        """Log-probs at (position, token) pairs of ``rows`` (the batch's groups' rows, in order).
        Shapes: group pass [G, M], M = max(L_g - P); suffix pass [B, S]; mask [B, P + M + S]."""
        import torch

        device = self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        B, G = len(rows), len(groups)
        group_of = [g for g, grp in enumerate(groups) for _ in grp.rows]
        M = max(g.end for g in groups) - P
        starts = [groups[g].end for g in group_of]
        lens = [len(r) - s for r, s in zip(rows, starts)]
        S = max(lens)
        plain = prefix is not None and _plain_layers(prefix)
        cache = None
        if prefix is not None and not plain:  # any other cache type: copy and select rows
            cache = _expanded(prefix, G if M else B, device)
        if M:  # level 2: each group's shared tokens, once per group (right-padded)
            g_ids = torch.full((G, M), pad, dtype=torch.long)
            g_mask = torch.zeros((G, P + M), dtype=torch.long)
            g_mask[:, :P] = 1
            first = 0
            for g, grp in enumerate(groups):
                n = grp.end - P
                if n:
                    g_ids[g, :n] = torch.tensor(rows[first][P: grp.end])
                    g_mask[g, P: P + n] = 1
                first += len(grp.rows)
            if plain:
                cache = _filled_cache(prefix, [lambda li: (prefix.layers[li].keys, prefix.layers[li].values)],
                                      [P], G, P + M)
            _, group_cache = self._forward(g_ids.to(device), g_mask.to(device),
                                           (P + torch.arange(M)).expand(G, M).to(device), cache, keep=1)
            select = torch.tensor(group_of, device=device)
            if plain:  # the suffix pass's buffer: prefix broadcast, then each row's group slots
                cache = _filled_cache(
                    prefix, [lambda li: (prefix.layers[li].keys, prefix.layers[li].values),
                             lambda li: (group_cache.layers[li].keys[select, :, P:],
                                         group_cache.layers[li].values[select, :, P:])],
                    [P, M], B, P + M + S)
            else:
                cache = group_cache
                cache.batch_select_indices(select)
        elif plain:
            cache = _filled_cache(prefix, [lambda li: (prefix.layers[li].keys, prefix.layers[li].values)],
                                  [P], B, P + S)
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros((B, P + M + S), dtype=torch.long)
        positions = torch.zeros((B, S), dtype=torch.long)
        mask[:, :P] = 1
        for b, (r, s, n) in enumerate(zip(rows, starts, lens)):
            input_ids[b, S - n:] = torch.tensor(r[s:])  # left padding: every row ends at column S - 1
            mask[b, P: s] = 1  # its group's prefix (the rest of the M slots belongs to other groups)
            mask[b, P + M + S - n:] = 1
            positions[b, S - n:] = torch.arange(s, len(r))
        # column of position t in row b: S - n_b + t - s_b; keep the last `keep` columns
        keep = max(n - (min(t for t, _ in w) - s) for w, s, n in zip(wanted, starts, lens))
        logits, _ = self._forward(input_ids.to(device), mask.to(device), positions.to(device), cache, keep)
        b_idx = torch.tensor([b for b, w in enumerate(wanted) for _ in w], device=device)
        c_idx = torch.tensor([keep - n + t - s for w, s, n in zip(wanted, starts, lens) for t, _ in w], device=device)
        tok = torch.tensor([t for w in wanted for _, t in w], device=device)
        picked = logits[b_idx, c_idx].float().log_softmax(-1).gather(-1, tok[:, None])[:, 0].tolist()
        out, k = [], 0
        for w in wanted:
            out.append(picked[k: k + len(w)])
            k += len(w)
        return out

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]],
                    progress: Callable[[int], None] | None = None) -> list[list[float]]:
        import torch

        rows, targets = self._plan(prompts, continuations)
        if not rows:
            return [[] for _ in continuations]
        # a row that is a prefix of another is read from the longer one (same logits there)
        alias = list(range(len(rows)))
        lex = sorted(range(len(rows)), key=rows.__getitem__)
        for a, b in zip(lex[::-1][1:], lex[::-1]):  # from the end: chains resolve to the longest
            if rows[b][: len(rows[a])] == rows[a]:
                alias[a] = alias[b]
        by_row: dict[int, set[tuple[int, int]]] = {}
        for _, _, row, pairs in targets:
            by_row.setdefault(alias[row], set()).update(pairs)
        live = sorted(by_row)
        wanted = {r: sorted(by_row[r]) for r in live}
        limits = {r: min(len(rows[r]) - 1, wanted[r][0][0]) for r in live}
        live_rows = [rows[r] for r in live]
        P = min(_common_prefix_len(live_rows), min(limits.values()))
        P = P if P >= self.min_prefix else 0
        local_groups = self._groups(live_rows, P, [limits[r] for r in live])
        values: dict[tuple[int, int, int], float] = {}
        with torch.inference_mode():
            prefix = self._prefix(live_rows[0][:P]) if P else None
            for batch in self._batches(live_rows, local_groups):
                idx = [live[r] for g in batch for r in g.rows]
                batch_groups, k = [], 0
                for g in batch:
                    batch_groups.append(_Group(list(range(k, k + len(g.rows))), g.end))
                    k += len(g.rows)
                got = self._run_batch([rows[r] for r in idx], [wanted[r] for r in idx], batch_groups, P, prefix)
                for r, v in zip(idx, got):
                    for pt, lp in zip(wanted[r], v):
                        values[(r, *pt)] = lp
                if progress:
                    progress(len(idx))
        result = [[0.0] * len(c) for c in continuations]
        for i, j, row, pairs in targets:
            result[i][j] = float(sum(values[(alias[row], *pt)] for pt in pairs))
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
