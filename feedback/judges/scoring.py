"""How judges read log-probs of answer tokens from a generator.

``make_scorer(generator)`` returns an object with
``score_batch(prompts, continuations) -> list[list[float]]`` (summed log-probs of each
continuation after the chat-templated prompt):

* for an in-process transformers model (a generator exposing ``.model`` and ``.tokenizer``):
  ``PrefixCachedScorer``, which runs the token prefix shared by all rows of a call (a judge's
  preamble, few-shot exemplars) ONCE and keeps its key/value cache across calls, runs the part
  shared by a few rows (the two orders of a judged pair share the request) once per group, and
  only each row's own suffix per row; single-token continuations (a judge's "1"/"2", a rubric's
  "0".."5") all come from one row per prompt (the next-token distribution at its last position);
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

from alignflow.schemas.generator import Messages


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


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences (bisection over slice equality, which
    runs in C: O(n log n) element compares instead of a Python loop over n tokens)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all ``rows``."""
    first = rows[0]
    n = len(first)
    for other in rows[1:]:
        n = _lcp(first[:n], other)
        if n == 0:
            break
    return n


def _weights_version(model: Any) -> Any:
    """The parameters' in-place version counters: a training step or ``load_state_dict`` between
    two calls bumps them, so a kept key/value cache is known stale. Parameters made under
    inference mode keep no counter: a fresh object, never equal (no reuse across calls)."""
    try:
        return tuple(p._version for p in model.parameters())
    except RuntimeError:
        return object()


def _plain_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain ``DynamicLayer`` (keys/values tensors
    [batch, heads, seq, d] that only grow along seq): the layout ``_KVBuffers`` preallocates.
    Other layer types (sliding window, linear attention states) take the generic path."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@functools.cache
def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A ``DynamicLayer`` over a preallocated buffer [batch, heads, total, d]: ``update``
        writes the new keys/values into the next free slots instead of concatenating, so each
        slot is written once (no copy of the cached part per forward)."""

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


class _KVBuffers:
    """Per-layer key/value buffers [rows, heads, width, d] that every pass of one phase reuses:
    slots [0, P) hold the call-wide prefix, broadcast ONCE; a pass takes the first B rows and
    P + M + S slots, writes its rows' group slots [P, P + M), and the model writes the rest
    (``BufferLayer``). Slots a row does not own are hidden by its attention mask."""

    def __init__(self, template: Any, rows: int, width: int, prefix: Any = None, P: int = 0):
        import torch

        self.template = template
        self.layers = []
        for li, layer in enumerate(template.layers):
            pair = []
            for k, ref in enumerate((layer.keys, layer.values)):
                buf = torch.empty((rows, ref.shape[1], width, ref.shape[-1]), dtype=ref.dtype, device=ref.device)
                buf[:, :, P:] = 0  # slots hidden by the mask must hold finite numbers, not garbage
                if P:
                    buf[:, :, :P] = (prefix.layers[li].keys, prefix.layers[li].values)[k]
                pair.append(buf)
            self.layers.append(pair)

    def cache(self, B: int, P: int, M: int, S: int, group_kv: Callable[[int], tuple[Any, Any]] | None = None) -> Any:
        """A cache (``template``'s type) over B rows and P + M + S slots, P + M of them filled;
        ``group_kv(layer) -> (keys, values)`` broadcastable to [B, heads, M, d] fills [P, P + M)."""
        layer_cls = _buffer_layer_class()
        out = copy.copy(self.template)
        out.layers = []
        for li, (keys, values) in enumerate(self.layers):
            keys, values = keys[:B, :, : P + M + S], values[:B, :, : P + M + S]
            if M:
                k, v = group_kv(li)
                keys[:, :, P: P + M], values[:, :, P: P + M] = k, v
            out.layers.append(layer_cls(keys, values, P + M))
        return out


def _expanded(cache: Any, n: int, device: Any) -> Any:
    """A copy of a batch-1 cache of any type for ``n`` rows (the generic path)."""
    import torch

    out = copy.deepcopy(cache)
    out.batch_select_indices(torch.zeros(n, dtype=torch.long, device=device))
    return out


def _length_batches(lengths: Sequence[int], max_rows: int, overhead: int = 64) -> list[tuple[int, int]]:
    """Cut items sorted by length (ascending) into consecutive batches of at most ``max_rows``,
    minimising padded tokens plus ``overhead`` tokens per batch (one model call's fixed cost):
    dynamic programming, cost(j, i) = overhead + (i - j) * lengths[i - 1]. Returns [(j, i)]."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - max_rows), i):
            cost = best[j] + overhead + (i - j) * lengths[i - 1]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    spans, i = [], n
    while i > 0:
        spans.append((cut[i], i))
        i = cut[i]
    return spans[::-1]


@dataclass
class _Group:
    """Rows (indices into the plan's rows) whose tokens [0, end) are identical: the call-wide
    prefix [0, P) plus their own shared part [P, end) (the two orders of a judged pair share the
    request). A row alone forms a group with end = P."""

    rows: list[int]
    end: int


def _group_chunks(groups: Sequence["_Group"], max_rows: int):
    """Consecutive groups in chunks of at most ``max_rows`` rows (a group larger than that alone);
    a group is never split (its rows share its key/value slots)."""
    chunk: list[_Group] = []
    rows = 0
    for grp in groups:
        if chunk and rows + len(grp.rows) > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(grp)
        rows += len(grp.rows)
    if chunk:
        yield chunk


class PrefixCachedScorer:
    """Log-probs of continuations from a causal LM, sharing the computation of common prefixes.

    Rows: one per distinct model input (prompt tokens, then all but the last continuation
    token). A single-token continuation needs no extra row: it is read from the next-token
    distribution after its prompt, so both answers of a judge prompt cost one row; a row that
    is a prefix of another is read from the longer one. Three levels:

    1. the token prefix P common to ALL rows of a call (a judge's preamble and exemplars) runs
       once ``[1, P]``; its key/value cache is kept for later calls with the same prefix;
    2. rows sorted lexicographically put rows sharing more than P side by side; runs sharing at
       least ``min_prefix`` more tokens form groups (the two orders of one pair share the
       request/conversation), whose shared part [P, L_g) runs once per group, groups of similar
       length together ``[G, M]``;
    3. each row's own suffix [L_g, len) runs ``[B, S]``, rows of similar suffix length together,
       left-padded so the positions predicting continuation tokens are the last columns: the LM
       head runs only there (``logits_to_keep``); position ids continue the row's prefix, and
       the attention mask ``[B, P + M + S]`` hides padding and other groups' slots.

    Levels 2 and 3 run ``chunk_rows`` rows (whole groups) at a time, so the group keys/values
    kept between the passes are bounded by the chunk, not by the call (a whole dataset).
    Keys/values go into preallocated buffers (prefix broadcast, group slots gathered, suffix
    written in place) rather than being copied and concatenated per pass. Models whose cache
    layers are not plain ``DynamicLayer`` s (sliding window, ...) get levels 1 and 3 through a
    copied cache. Tokenization is that of ``HFGenerator.score_batch``: prompt tokens (chat
    template), then the continuation tokenized on its own. Equal to scoring each full sequence
    from scratch up to float rounding (tested; ``tests/bench/bench_judge.py`` prints the gap).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, min_prefix: int = 8,
                 chunk_rows: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows or 8 * batch_size  # rows whose group keys/values are held at once
        self.min_prefix = min_prefix
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._prefix_ids: tuple[int, ...] | None = None
        self._prefix_cache: Any = None
        self._prefix_weights: Any = None
        self.prefix_hits = 0  # calls that reused a cached prefix (for tests and benches)

    # -- planning -------------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added), each distinct text encoded once."""
        unique = list(dict.fromkeys(texts))
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        fast = getattr(backend, "encode_batch_fast", None)  # a fast tokenizer's encoder, without offsets
        if fast is not None and backend.padding is None and backend.truncation is None:
            ids = [e.ids for e in fast(unique, add_special_tokens=False)]
        else:
            ids = self.tokenizer(unique, add_special_tokens=False)["input_ids"]
        by_text = dict(zip(unique, ids))
        return [list(by_text[t]) for t in texts]

    def _plan(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]]):
        """Rows to run and, per continuation, which row positions predict which tokens.

        Returns ``rows`` (token tuples) and ``targets``: (item, continuation, row,
        [(position, token), ...]), position t predicting ``token`` (the token at t + 1)."""
        prompt_ids = self._tokenize([render_chat(self.tokenizer, m) for m in prompts])
        unique_conts = list(dict.fromkeys(c for cs in continuations for c in cs))
        cont_ids = dict(zip(unique_conts, self._tokenize(unique_conts))) if unique_conts else {}
        rows: dict[tuple[int, ...], int] = {}
        targets = []
        for i, conts in enumerate(continuations):
            p = prompt_ids[i]
            for j, c in enumerate(conts):
                if not cont_ids[c]:
                    raise ValueError(f"continuation {c!r} adds no token after the prompt")
                full = p + cont_ids[c]
                row = rows.setdefault(tuple(full[:-1]), len(rows))
                targets.append((i, j, row, [(t - 1, full[t]) for t in range(len(p), len(full))]))
        return list(rows), targets

    def _groups(self, rows: list[tuple[int, ...]], P: int, limits: list[int]) -> list[_Group]:
        """Level 2: rows sorted lexicographically; a run of neighbours sharing at least
        ``min_prefix`` tokens beyond ``P`` is a group. A group's end is capped so every row keeps
        at least one token and all its target positions after it (``limits``)."""
        order = sorted(range(len(rows)), key=rows.__getitem__)
        runs: list[list[int]] = []
        shared: list[int] = []  # tokens the run's rows share
        for r in order:
            if runs:
                lcp = min(shared[-1], _lcp(rows[runs[-1][-1]], rows[r]))
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

    # -- running --------------------------------------------------------------------------
    def _prefix(self, ids: tuple[int, ...]):
        import torch

        weights = _weights_version(self.model)
        if self._prefix_ids == ids and self._prefix_weights == weights:
            self.prefix_hits += 1
            return self._prefix_cache
        self._prefix_weights = weights
        _, cache = self._forward(torch.tensor([ids], device=self.model.device), None, None, None, keep=1)
        self._prefix_ids, self._prefix_cache = ids, cache
        return cache

    def _forward(self, ids, mask, positions, cache, keep: int | None, use_cache: bool = True):
        """One model call; returns logits of the last ``keep`` positions and the cache."""
        kwargs: dict[str, Any] = {"use_cache": use_cache}
        if mask is not None:
            kwargs.update(attention_mask=mask, position_ids=positions)
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if keep is not None and self._keep_kw:
            kwargs[self._keep_kw] = keep
        out = self.model(ids, **kwargs)
        logits = out.logits if keep is None else out.logits[:, -keep:]
        return logits, (getattr(out, "cache", None) or getattr(out, "past_key_values", None))

    def _plain_cache(self, prefix: Any) -> bool:
        """Whether this model's cache has plain layers (buffers and level 2 apply)."""
        if prefix is not None:
            return _plain_layers(prefix)
        from transformers import DynamicCache

        try:
            return _plain_layers(DynamicCache(config=self.model.config))
        except Exception:  # an unusual config: stay on the generic path
            return False

    def _group_pass(self, rows: list[tuple[int, ...]], groups: list[_Group], P: int, prefix: Any):
        """Level 2: the shared tokens [P, L_g) of every group, run once, groups of similar length
        together ([Gc, Mc] per pass, right-padded). Returns a cache to copy layer shapes from,
        {group index: slot} and per layer (keys, values) [slots, heads, max(L_g - P), d]."""
        import torch

        device = self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        multi = sorted((g for g, grp in enumerate(groups) if grp.end > P), key=lambda g: groups[g].end)
        if not multi:
            return prefix, {}, None
        width = groups[multi[-1]].end - P
        template, kv = prefix, None
        spans = _length_batches([groups[g].end - P for g in multi], self.batch_size)
        buffers = None
        if prefix is not None:
            buffers = _KVBuffers(prefix, max(j - i for i, j in spans), P + width, prefix, P)
        for start, stop in spans:
            chunk = multi[start: stop]
            Gc, Mc = len(chunk), groups[chunk[-1]].end - P
            ids = torch.full((Gc, Mc), pad, dtype=torch.long)
            mask = torch.zeros((Gc, P + Mc), dtype=torch.long)
            mask[:, :P] = 1
            for k, g in enumerate(chunk):
                grp = groups[g]
                ids[k, : grp.end - P] = torch.tensor(rows[grp.rows[0]][P: grp.end])
                mask[k, P: grp.end] = 1
            cache = buffers.cache(Gc, P, 0, Mc) if buffers is not None else None
            _, cache = self._forward(ids.to(device), mask.to(device), (P + torch.arange(Mc)).expand(Gc, Mc).to(device),
                                     cache, keep=1)
            if kv is None:
                template = template if template is not None else cache
                kv = [tuple(torch.zeros((len(multi), t.shape[1], width, t.shape[-1]), dtype=t.dtype, device=t.device)
                            for t in (layer.keys, layer.values)) for layer in cache.layers]
            for (keys, values), layer in zip(kv, cache.layers):
                keys[start: start + Gc, :, :Mc] = layer.keys[:, :, P: P + Mc]
                values[start: start + Gc, :, :Mc] = layer.values[:, :, P: P + Mc]
        return template, {g: k for k, g in enumerate(multi)}, kv

    def _run_batch(self, rows: list[tuple[int, ...]], wanted: list[list[tuple[int, int]]], ends: list[int],
                   slots: list[int], P: int, prefix: Any, kv: Any, buffers: "_KVBuffers | None") -> list[list[float]]:
        """Log-probs at (position, token) pairs of ``rows``, whose tokens before ``ends`` are
        cached: [0, P) in ``prefix`` (and ``buffers``), [P, end) in ``kv`` at ``slots`` (``_group_pass``).
        Shapes: suffix [B, S] left-padded; mask [B, P + M + S] with M = max(end - P)."""
        import torch

        device = self.model.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        B = len(rows)
        M = max(ends) - P
        lens = [len(r) - e for r, e in zip(rows, ends)]
        S = max(lens)
        if buffers is not None:
            sel = torch.tensor(slots, device=device)
            cache = buffers.cache(B, P, M, S, lambda li: (kv[li][0][sel, :, :M], kv[li][1][sel, :, :M]))
        else:
            cache = _expanded(prefix, B, device) if prefix is not None else None
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros((B, P + M + S), dtype=torch.long)
        positions = torch.zeros((B, S), dtype=torch.long)
        mask[:, :P] = 1
        for b, (r, e, n) in enumerate(zip(rows, ends, lens)):
            input_ids[b, S - n:] = torch.tensor(r[e:])  # left padding: every row ends at column S - 1
            mask[b, P: e] = 1  # its group's slots (the rest of the M slots is padding)
            mask[b, P + M + S - n:] = 1
            positions[b, S - n:] = torch.arange(e, len(r))
        # position t of row b sits in column S - n_b + t - e_b: keep the last `keep` columns
        keep = max(n - (w[0][0] - e) for w, e, n in zip(wanted, ends, lens))
        logits, _ = self._forward(input_ids.to(device), mask.to(device), positions.to(device), cache, keep,
                                  use_cache=cache is not None)
        b_idx = torch.tensor([b for b, w in enumerate(wanted) for _ in w], device=device)
        c_idx = torch.tensor([keep - n + t - e for w, e, n in zip(wanted, ends, lens) for t, _ in w], device=device)
        tok = torch.tensor([t for w in wanted for _, t in w], device=device)
        picked = logits[b_idx, c_idx].float().log_softmax(-1).gather(-1, tok[:, None])[:, 0].tolist()
        out, k = [], 0
        for w in wanted:
            out.append(picked[k: k + len(w)])
            k += len(w)
        return out

    def _score_groups(self, rows: list[tuple[int, ...]], wanted: list[list[tuple[int, int]]], groups: list[_Group],
                      P: int, prefix: Any, plain: bool, progress: Callable[[int], None] | None):
        """Levels 2 and 3 for the rows of ``groups``: yields (row index, log-probs at its wanted
        (position, token) pairs)."""
        shared = self._group_pass(rows, groups, P, prefix) if plain else None
        end_of: dict[int, int] = {}
        slot_of: dict[int, int] = {}
        for g, grp in enumerate(groups):
            for r in grp.rows:
                end_of[r], slot_of[r] = grp.end, (shared[1].get(g, 0) if shared else 0)
        # rows of similar suffix length together: little padding
        order = sorted(end_of, key=lambda r: len(rows[r]) - end_of[r])
        spans = _length_batches([len(rows[r]) - end_of[r] for r in order], self.batch_size)
        template, kv = (shared[0], shared[2]) if shared else (prefix, None)
        buffers = None
        if plain and template is not None:
            width = max(max(end_of[r] for r in order[i:j]) + len(rows[order[j - 1]]) - end_of[order[j - 1]]
                        for i, j in spans)
            buffers = _KVBuffers(template, max(j - i for i, j in spans), width, prefix, P)
        for start, stop in spans:
            idx = order[start: stop]
            got = self._run_batch([rows[r] for r in idx], [wanted[r] for r in idx], [end_of[r] for r in idx],
                                  [slot_of[r] for r in idx], P, prefix, kv, buffers)
            yield from zip(idx, got)
            if progress:
                progress(len(idx))

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[Sequence[str]],
                    progress: Callable[[int], None] | None = None) -> list[list[float]]:
        import torch

        rows, targets = self._plan(prompts, continuations)
        if not rows:
            return [[] for _ in continuations]
        # a row that is a prefix of another is read from the longer one (same logits there)
        alias = list(range(len(rows)))
        lex = sorted(range(len(rows)), key=rows.__getitem__)
        for a, b in zip(lex[-2::-1], lex[::-1]):  # from the end: chains resolve to the longest
            if rows[b][: len(rows[a])] == rows[a]:
                alias[a] = alias[b]
        by_row: dict[int, set[tuple[int, int]]] = {}
        for _, _, row, pairs in targets:
            by_row.setdefault(alias[row], set()).update(pairs)
        live = sorted(by_row)
        live_rows = [rows[r] for r in live]
        wanted = [sorted(by_row[r]) for r in live]
        limits = [min(len(r) - 1, w[0][0]) for r, w in zip(live_rows, wanted)]
        P = min(_common_prefix_len(live_rows), min(limits))
        P = P if P >= self.min_prefix else 0
        values: dict[tuple[int, int, int], float] = {}
        with torch.inference_mode():
            prefix = self._prefix(live_rows[0][:P]) if P else None
            plain = self._plain_cache(prefix)
            groups = self._groups(live_rows, P, limits) if plain else [_Group([r], P) for r in range(len(live))]
            # levels 2 and 3 a chunk of groups at a time: the groups' kept keys/values
            # [groups, heads, L_g - P, d] per layer grow with the chunk, not with the whole call
            for chunk in _group_chunks(groups, self.chunk_rows):
                for r, v in self._score_groups(live_rows, wanted, chunk, P, prefix, plain, progress):
                    for pt, lp in zip(wanted[r], v):
                        values[(live[r], *pt)] = lp
        result = [[0.0] * len(c) for c in continuations]
        for i, j, row, pairs in targets:
            result[i][j] = float(sum(values[(alias[row], *pt)] for pt in pairs))
        return result


def make_scorer(generator: Any, batch_size: int | None = None) -> Scorer:
    """The fastest scorer a generator allows (see the module docstring)."""
    if generator is None:
        raise ValueError("a judge that reads log-probs needs a generator")
    # an in-process model is one with ``.forward``: an HTTP client's ``.model`` is a name (and its
    # ``.tokenizer`` a lazily loaded template source, not to be touched here)
    model = getattr(generator, "model", None)
    tokenizer = getattr(generator, "tokenizer", None) if hasattr(model, "forward") else None
    if tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
        return PrefixCachedScorer(model, tokenizer, batch_size=batch_size or getattr(generator, "batch_size", 64) or 64)
    return GeneratorScorer(generator)


class LLMJudgeBase:
    """What the LLM judges share: a lazily built scorer over their generator, its provenance, the
    control strings of its template (escaped in quoted text) and prompts fitted to its context."""

    generator: Any
    batch_size: int
    _scorer: "Scorer | None"
    _markers: tuple[str, ...] | None = None
    last_truncated: int = 0  # prompts of the last call whose texts were cut to fit the context

    def quoting(self, template: Any) -> Any:
        """``template`` with the control strings of the judge's tokenizer and template added to the
        strings its quoting escapes (``feedback.context.control_strings``)."""
        import dataclasses

        from alignflow.feedback.context import control_strings, tokenizer_of

        if self._markers is None:
            self._markers = control_strings(tokenizer_of(self.generator))
        merged = tuple(sorted(set(template.markers) | set(self._markers), key=lambda m: (-len(m), m)))
        return template if merged == template.markers else dataclasses.replace(template, markers=merged)

    def fitter(self) -> Any:
        """A ``feedback.context.PromptFitter`` for this judge's model (counts what it cuts)."""
        from alignflow.feedback.context import fitter_for

        return fitter_for(self.generator, what=f"{getattr(self, 'name', 'judge')} prompt")

    @property
    def scorer(self) -> "Scorer":
        if self._scorer is None:
            self._scorer = make_scorer(self.generator, self.batch_size)
        return self._scorer

    def generator_provenance(self) -> Any:
        gen = getattr(self.generator, "provenance", None)
        return gen() if callable(gen) else getattr(self.generator, "name", type(self.generator).__name__)
