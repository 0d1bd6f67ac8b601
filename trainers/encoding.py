"""Token-level encoding every trainer shares: prompts and responses to ids, right-padded
``TokenBatch``es, per-token log-probs, sequence KL, and the left padding / KV-cache helpers of
incremental decoding.

Conventions (all right-padded, one row per (prompt, response)):

- ``TokenBatch.input_ids`` ``[B, T]``: ``prompt | response (+ eos if it finished) | pad``.
- Per-token tensors are indexed by ACTION: column ``t`` of a ``[B, T-1]`` tensor is about token
  ``input_ids[:, t+1]`` predicted from ``input_ids[:, :t+1]``; ``action_mask`` ``[B, T-1]`` is
  True on response tokens only. Responses are contiguous, so "the next action" of a response
  action is column ``t+1`` while ``action_mask[:, t+1]`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from alignflow.schemas.generator import Messages
from alignflow.trainers.modeling import device_of


def as_messages(prompt: str | Messages) -> Messages:
    """A plain-text prompt becomes one user turn (the DESIGN's prompt convention)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def prompt_text_of(prompt: Messages) -> str:
    """The last user turn's text (what a programmatic reward like the toy task reads)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of the prompt with the assistant header (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        # text first, then ids without extra specials: the same ids the hf generator samples after
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in prompt) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, response: str, finished: bool = True) -> list[int]:
    """Response ids, plus eos when the sample ended by itself (a truncated sample gets none)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if finished and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class TokenBatch:
    """Right-padded ``prompt | response | pad`` rows; see the module docstring for shapes."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    action_mask: torch.Tensor  # [B, T-1] bool: column t is response token input_ids[:, t+1]

    @property
    def actions(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def to(self, device: torch.device | str) -> "TokenBatch":
        """The same batch on ``device`` (no copy when it is already there)."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.action_mask.to(device))


def make_token_batch(prompts_ids: Sequence[Sequence[int]], responses_ids: Sequence[Sequence[int]],
                     pad_id: int) -> TokenBatch:
    """Lay out B (prompt, response) id lists as a right-padded ``TokenBatch``."""
    rows = [list(p) + list(r) for p, r in zip(prompts_ids, responses_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts_ids, responses_ids)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, len(p):n] = True
    return TokenBatch(input_ids, attention_mask, response_mask[:, 1:])


def encode_samples(tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str],
                   finished: Sequence[bool] | None = None) -> TokenBatch:
    """Tokenise aligned prompts and responses into one ``TokenBatch``."""
    finished = finished if finished is not None else [True] * len(responses)
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    r_ids = [encode_response(tokenizer, r, f) for r, f in zip(responses, finished)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_token_batch(p_ids, r_ids, pad)


def gather_token_logprobs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[actions]`` in float32: ``[B, T-1, V]``, ``[B, T-1]`` -> ``[B, T-1]``."""
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    return logits.gather(-1, actions[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def forward_token_logprobs(model: torch.nn.Module, batch: TokenBatch,
                           return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-action log-probs ``[B, T-1]`` (zero off the response) and optionally the last hidden
    state at the predicting positions ``[B, T-1, H]`` (what a value head reads); both on the
    model's device (``batch`` is moved there if it is not)."""
    batch = batch.to(device_of(model))
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=return_hidden, use_cache=False)
    logps = gather_token_logprobs(out.logits[:, :-1], batch.actions) * batch.action_mask
    hidden = out.hidden_states[-1][:, :-1] if return_hidden else None
    return logps, hidden


@torch.no_grad()
def sequence_kl(policy: torch.nn.Module, ref: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Monte-Carlo KL(pi || pi_ref) per sample, ``sum_t log pi(a_t) - log pi_ref(a_t)``: ``[B]``.

    Unbiased when the responses were sampled from ``policy``."""
    lp, _ = forward_token_logprobs(policy, batch)
    rlp, _ = forward_token_logprobs(ref, batch)
    return (lp - rlp.to(lp.device)).sum(-1)


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` ``[N, W]`` of left-padded sequences (on the
    CPU), so every row's next token is predicted at the last column (incremental decoding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x; ``past_key_values``
    is deprecated there) or ``past_key_values`` (older models)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` on older models)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
