"""Sequence log-probabilities of responses, summed over response tokens, in one forward pass.

Every preference loss (DESIGN.md, "Loss interface") reads per-sequence summaries
``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` and the token count ``|y|``. This module computes
them for a whole batch of prompts with K responses each (pairwise K = 2, listwise K <= K_max,
binary K = 1) in ONE forward pass of the model, two ways that give the same numbers:

- ``plain``: one row per (prompt, response): ``[prompt | response_k | pad]``.
- ``packed`` (shared prompt): one row per prompt: ``[prompt | response_1 | ... | response_K | pad]``
  with a block attention mask (each response sees the prompt and itself, never another
  response) and position ids that restart at ``len(prompt)`` for every response, so each
  response token sees exactly the context it sees in the plain layout. The prompt is computed
  once for all K responses (for the benchmark's pairs, ~a fifth fewer tokens).

Both layouts produce flat "target" vectors (which row, which position predicts the token, which
token, which (example, response) it belongs to), so the language-model head and the
log-softmax run only over response tokens, never over prompt or padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from alignflow.schemas.generator import Messages
from alignflow.trainers.encoding import encode_prompt, encode_response
from alignflow.trainers.modeling import device_of

LAYOUTS = ("packed", "plain")


@dataclass
class SequenceBatch:
    """Tensors for one forward pass over B prompts with up to K responses each.

    Shapes: R rows of length T (R = B packed, R = number of real responses plain);
    N = total response tokens in the batch.
    """

    input_ids: torch.Tensor  # [R, T] long
    position_ids: torch.Tensor  # [R, T] long
    attention_mask: torch.Tensor  # [R, T] (plain) or [R, 1, T, T] bool (packed)
    target_row: torch.Tensor  # [N] row of each response token
    target_pos: torch.Tensor  # [N] position whose output predicts the token
    target_ids: torch.Tensor  # [N] the token
    target_seq: torch.Tensor  # [N] flat index b * K + k of its (example, response)
    num_examples: int  # B
    num_responses: int  # K (max over the batch)

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(getattr(self, f).to(device) if isinstance(getattr(self, f), torch.Tensor)
                               else getattr(self, f) for f in self.__dataclass_fields__))


def build_sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]],
                         pad_id: int, layout: str = "packed") -> SequenceBatch:
    """Lay out B prompts and their responses (``responses[b]`` is a list of K_b token lists).

    ``layout="packed"`` puts a prompt and all its responses in one row (see module docstring);
    ``"plain"`` gives each (prompt, response) its own row. Response k of example b is sequence
    ``b * K + k`` where K = max K_b; missing responses (k >= K_b) have no tokens.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    num_b = len(prompts)
    num_k = max((len(r) for r in responses), default=1)
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    segments: list[list[int]] = []  # packed: 0 prompt, k + 1 response k
    t_row: list[int] = []
    t_pos: list[int] = []
    t_ids: list[int] = []
    t_seq: list[int] = []
    for b, (prompt, resps) in enumerate(zip(prompts, responses)):
        p = len(prompt)
        if p == 0:
            raise ValueError(f"example {b}: empty prompt (a response needs at least one context token)")
        if layout == "packed":
            row = list(prompt)
            pos = list(range(p))
            seg = [0] * p
            for k, resp in enumerate(resps):
                start = len(row)
                row.extend(resp)
                pos.extend(range(p, p + len(resp)))
                seg.extend([k + 1] * len(resp))
                # token t of this response is predicted by the previous token of the same
                # response, the first one by the last prompt token
                t_row.extend([len(rows)] * len(resp))
                t_pos.extend([p - 1] + list(range(start, start + len(resp) - 1)) if resp else [])
                t_ids.extend(resp)
                t_seq.extend([b * num_k + k] * len(resp))
            rows.append(row)
            positions.append(pos)
            segments.append(seg)
        else:
            for k, resp in enumerate(resps):
                t_row.extend([len(rows)] * len(resp))
                t_pos.extend(range(p - 1, p - 1 + len(resp)))
                t_ids.extend(resp)
                t_seq.extend([b * num_k + k] * len(resp))
                rows.append(list(prompt) + list(resp))
                positions.append(list(range(p + len(resp))))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    for i, (row, pos) in enumerate(zip(rows, positions)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        position_ids[i, : len(pos)] = torch.tensor(pos, dtype=torch.long)
    if layout == "packed":
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, s in enumerate(segments):
            seg[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask = block_attention_mask(seg)
    else:
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return SequenceBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        target_row=torch.tensor(t_row, dtype=torch.long),
        target_pos=torch.tensor(t_pos, dtype=torch.long),
        target_ids=torch.tensor(t_ids, dtype=torch.long),
        target_seq=torch.tensor(t_seq, dtype=torch.long),
        num_examples=num_b,
        num_responses=num_k,
    )


def padded_tokens(prompt_len: int, response_lens: Sequence[int], layout: str) -> tuple[int, int]:
    """``(rows, width)`` one example occupies in ``build_sequence_batch``'s layout: packed is one
    row of prompt + all responses, plain one row of prompt + response per response."""
    if layout == "packed":
        return 1, prompt_len + sum(response_lens)
    return len(response_lens), prompt_len + max(response_lens, default=0)


def chunk_by_tokens(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]], layout: str,
                    max_tokens: int | None, max_examples: int | None = None) -> list[list[int]]:
    """Consecutive examples grouped so that each group's padded batch (rows x widest row) holds at
    most ``max_tokens`` tokens and at most ``max_examples`` examples; an example that alone is
    over the budget forms its own group. Memory of a forward pass grows with the padded tokens
    (and with the square of the width in attention), not with the number of rows."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = width = 0
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        r, w = padded_tokens(len(p), [len(x) for x in rs], layout)
        full = max_examples is not None and len(current) >= max_examples
        over = max_tokens is not None and (rows + r) * max(width, w) > max_tokens
        if current and (full or over):
            groups.append(current)
            current, rows, width = [], 0, 0
        current.append(i)
        rows, width = rows + r, max(width, w)
    if current:
        groups.append(current)
    return groups


def block_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Shared-prompt causal mask from segment ids ``[R, T]`` (0 prompt, k response k, -1 pad).

    Query i may see key j iff ``j <= i`` and key j is in the prompt or in i's own segment.
    Padding queries see the padding before them (never an empty row, so no NaN).
    Returns bool ``[R, 1, T, T]`` (True = attend), the form SDPA and transformers accept.
    """
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    key = segments[:, None, :]
    query = segments[:, :, None]
    allowed = causal[None] & ((key == 0) | (key == query))
    return allowed[:, None]


def _supports_custom_mask(model: torch.nn.Module) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in (None, "sdpa", "eager")


def resolve_layout(model: torch.nn.Module, layout: str) -> str:
    """``packed`` needs an attention that takes a custom 4D mask (sdpa, eager); else ``plain``."""
    if layout == "packed" and not _supports_custom_mask(model):
        return "plain"
    return layout


def _head_inputs(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Logits ``[N, V]`` at the target positions only (the LM head skips prompts and padding)."""
    mask = batch.attention_mask
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if mask.dim() == 4 and impl == "eager":  # eager adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = None
    if head is not None and hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, ValueError):
            decoder = None
    if decoder is None or decoder is model:
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                       use_cache=False).logits
        return logits[batch.target_row, batch.target_pos]
    hidden = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                     use_cache=False).last_hidden_state
    logits = head(hidden[batch.target_row, batch.target_pos])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def sequence_logps(model: torch.nn.Module, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts, both ``[B, K]``, from one forward pass.

    ``logps[b, k] = sum_t log pi(y_t | x, y_<t)`` over the response tokens of response k of
    example b (0 for a missing response); ``tokens[b, k] = |y|``. The log-softmax runs in
    float32 (or float64 for a float64 model), never in bf16.
    """
    logits = _head_inputs(model, batch)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    token_logps = logits.gather(-1, batch.target_ids[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    size = batch.num_examples * batch.num_responses
    logps = torch.zeros(size, dtype=token_logps.dtype, device=token_logps.device).index_add_(
        0, batch.target_seq, token_logps)
    tokens = torch.bincount(batch.target_seq, minlength=size)
    shape = (batch.num_examples, batch.num_responses)
    return logps.view(shape), tokens.view(shape)

def response_logps(model: nn.Module, tokenizer: Any, prompts: Sequence[Messages],
                   responses: Sequence[Sequence[str]], finished: Sequence[Sequence[bool]] | None = None,
                   layout: str = "packed") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts ``[B, K]`` of K responses per prompt (eos included when
    finished), on the model's device."""
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    finished = finished or [[True] * len(r) for r in responses]
    r_ids = [[encode_response(tokenizer, r, f) for r, f in zip(rs, fs)] for rs, fs in zip(responses, finished)]
    batch = build_sequence_batch(p_ids, r_ids, tokenizer.pad_token_id, resolve_layout(model, layout))
    return sequence_logps(model, batch.to(device_of(model)))
