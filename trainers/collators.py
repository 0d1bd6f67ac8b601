"""Pre-tokenization of store datasets and the collators that batch them for one forward pass.

Every kind becomes the same example shape, tokenized ONCE before training (the chat template
per example inside the loop would double a CPU run)::

    {"prompt_ids": list[int], "response_ids": list[list[int]]  # K responses
     , "ref_logps": list[float] (if the dataset has reference columns), ...kind fields}

pairwise: K = 2 (chosen, rejected); listwise: K = len(responses) (varies by row), ``scores``;
binary: K = 1, ``label`` and the KL pair of KTO (``kl_response_ids``: the response of the next
row under this row's prompt, a mismatched pair; ``ref_kl_logps`` when precomputed).
``truncated`` is True where ``max_length`` cut the prompt or a response (see ``truncated``).

The prompt is rendered with the tokenizer's chat template and ``add_generation_prompt=True``;
a response's tokens are the rest of the templated conversation with the response as the
assistant turn, up to and including eos (the response, then end-of-turn/eos; what a template
writes after eos, such as ChatML's newline, is never sampled and is cut), the same tokens the
SFT stage trains on and a generator samples.

Collators only pad and lay out (``trainers.logprobs.build_sequence_batch``) and return the
loss batch keys of DESIGN.md ("Loss interface") beside the sequences (``seqs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from alignflow.trainers.logprobs import build_sequence_batch, chunk_by_tokens

KINDS = ("pairwise", "listwise", "binary")


# ---- tokenization ---------------------------------------------------------------------------------

def _messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt as text the model continues (chat template with the generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No template: contents one per line, as a plain-text continuation task.
    bos = tokenizer.bos_token or ""
    return bos + "\n".join(m["content"] for m in messages) + "\n"


def render_completion(tokenizer, messages: list[dict], prompt_text: str, response: str) -> str:
    """The text that follows ``prompt_text`` when ``response`` is the assistant turn."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if full.startswith(prompt_text):
            completion = full[len(prompt_text):]
            # the turn ends at eos: what a template writes after it (ChatML's newline) is never sampled
            end = completion.find(eos, len(response)) if eos else -1
            return completion[: end + len(eos)] if end >= 0 else completion
    return response + eos


def tokenize_prompts_responses(tokenizer, prompts: Sequence[Any], responses: Sequence[Sequence[str]],
                               max_length: int | None = None) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids of each prompt and of each of its responses (batched tokenizer calls).

    With ``max_length``, a prompt keeps its last tokens so that prompt + longest response fit
    when possible (at most half of ``max_length`` is taken from responses), and responses are
    cut at the end.
    """
    prompt_texts: list[str] = []
    completion_texts: list[str] = []
    counts: list[int] = []
    for prompt, resps in zip(prompts, responses):
        msgs = _messages(prompt)
        text = render_prompt(tokenizer, msgs)
        prompt_texts.append(text)
        completion_texts.extend(render_completion(tokenizer, msgs, text, r) for r in resps)
        counts.append(len(resps))
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"] if prompt_texts else []
    flat = tokenizer(completion_texts, add_special_tokens=False)["input_ids"] if completion_texts else []
    response_ids: list[list[list[int]]] = []
    start = 0
    for c in counts:
        response_ids.append([list(x) for x in flat[start:start + c]])
        start += c
    prompt_ids = [list(p) for p in prompt_ids]
    if max_length is not None:
        for i, (p, rs) in enumerate(zip(prompt_ids, response_ids)):
            prompt_ids[i], response_ids[i] = truncated(p, rs, max_length)
    return prompt_ids, response_ids


def truncated(prompt: list[int], responses: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Prompt and responses cut so that prompt + each response fits ``max_length`` tokens: the
    prompt keeps its last tokens (at least one, and room for ``min(longest, max_length // 2)``
    response tokens), responses lose their ends. Unchanged when everything fits."""
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest <= max_length:
        return prompt, responses
    keep_prompt = max(1, min(len(prompt), max_length - min(longest, max_length // 2)))
    return prompt[-keep_prompt:], [r[: max_length - keep_prompt] for r in responses]


def pretokenize(table, kind: str, tokenizer, max_length: int | None = None) -> list[dict]:
    """Rows of a store table (pyarrow) of ``kind`` as pre-tokenized examples (see module doc).

    Reference columns present in the table (``ref_chosen_logps``/``ref_rejected_logps``,
    ``ref_logps``, ``ref_kl_logps``) are carried as ``ref_logps`` / ``ref_kl_logps``; a row with
    a null reference value makes the whole column count as absent (ValueError names the row).
    """
    if kind not in KINDS:
        raise ValueError(f"cannot train on a {kind!r} dataset; preference training takes {', '.join(KINDS)}")
    cols = set(table.column_names)
    prompts = table.column("prompt").to_pylist()
    if kind == "pairwise":
        responses = [list(x) for x in zip(table.column("chosen").to_pylist(), table.column("rejected").to_pylist())]
    elif kind == "listwise":
        responses = table.column("responses").to_pylist()
    else:
        responses = [[r] for r in table.column("response").to_pylist()]
    prompt_ids, response_ids = tokenize_prompts_responses(tokenizer, prompts, responses)
    examples = []
    for p, rs in zip(prompt_ids, response_ids):
        cut_p, cut_rs = truncated(p, rs, max_length) if max_length is not None else (p, rs)
        examples.append({"prompt_ids": cut_p, "response_ids": cut_rs, "truncated": cut_p is not p})

    def column(name: str) -> list | None:
        if name not in cols:
            return None
        values = table.column(name).to_pylist()
        for i, v in enumerate(values):
            if v is None or (isinstance(v, list) and any(x is None for x in v)):
                raise ValueError(f"row {i}, field {name}: null value (recompute the reference columns)")
        return values

    if kind == "pairwise":
        ref_c, ref_r = column("ref_chosen_logps"), column("ref_rejected_logps")
        if ref_c is not None and ref_r is not None:
            for ex, c, r in zip(examples, ref_c, ref_r):
                ex["ref_logps"] = [c, r]
        for name in ("chosen_winrate", "rejected_winrate"):
            values = column(name)
            if values is not None:
                for ex, v in zip(examples, values):
                    ex[name] = v
    elif kind == "listwise":
        for ex, s in zip(examples, table.column("scores").to_pylist()):
            ex["scores"] = s
        ref = column("ref_logps")
        if ref is not None:
            for i, (ex, r) in enumerate(zip(examples, ref)):
                if len(r) != len(ex["response_ids"]):
                    raise ValueError(f"row {i}, field ref_logps: {len(r)} values for {len(ex['response_ids'])} responses")
                ex["ref_logps"] = r
    else:
        for ex, label in zip(examples, table.column("label").to_pylist()):
            ex["label"] = bool(label)
        add_kl_pairs(examples)
        ref, ref_kl = column("ref_logps"), column("ref_kl_logps")
        if ref is not None:
            for ex, r in zip(examples, ref):
                ex["ref_logps"] = [r]
        if ref_kl is not None:
            for ex, r in zip(examples, ref_kl):
                ex["ref_kl_logps"] = r
    check_reference_tokens(table, kind, examples)
    return examples


def check_reference_tokens(table, kind: str, examples: list[dict]) -> None:
    """Reference log-probs are sums over the response tokens ``precompute-ref`` saw, recorded in
    the token-count columns; a different tokenizer or ``--max-length`` here would silently compare
    log-probs of different sequences, so a mismatch is an error naming the first row."""
    if not examples or "ref_logps" not in examples[0]:
        return
    names = {"pairwise": ("chosen_tokens", "rejected_tokens")}.get(kind, ("tokens",))
    if not all(n in table.column_names for n in names):
        return
    columns = [table.column(n).to_pylist() for n in names]
    recorded = list(zip(*columns)) if kind == "pairwise" else columns[0]
    for i, (ex, counts) in enumerate(zip(examples, recorded)):
        counts = list(counts) if isinstance(counts, (list, tuple)) else [counts]
        got = [len(r) for r in ex["response_ids"]]
        if counts != got and None not in counts:
            raise ValueError(f"row {i}, field {'/'.join(names)}: the reference columns count {counts} response tokens, "
                             f"this tokenizer and --max-length give {got}; recompute them with the same settings "
                             "(alignflow precompute-ref)")


def add_kl_pairs(examples: list[dict]) -> None:
    """KTO's mismatched pairs (eq. 33): row i's prompt with the response of row (i + 1) mod N.

    The pairing is fixed by dataset order (the order the reference columns were computed in),
    so a reference log-prob can be precomputed for each pair; every batch then estimates the
    reference point from the mismatched pairs of its own rows.
    """
    n = len(examples)
    for i, ex in enumerate(examples):
        ex["kl_response_ids"] = examples[(i + 1) % n]["response_ids"][0] if n > 1 else []


# ---- collators --------------------------------------------------------------------------------------

@dataclass
class _Collator:
    """``max_tokens``: a batch whose padded layout would exceed this many tokens is laid out as
    consecutive chunks under ``<name>_chunks`` instead of one ``<name>`` (the trainer runs them one
    at a time, recomputing each in the backward pass: same gradient, bounded memory)."""

    pad_token_id: int
    layout: str = "packed"
    max_tokens: int | None = field(default=None, kw_only=True)

    def _seqs(self, examples: Sequence[dict], key: str = "response_ids") -> dict:
        batch = build_sequence_batch([e["prompt_ids"] for e in examples],
                                     [e[key] if key == "response_ids" else [e[key]] for e in examples],
                                     self.pad_token_id, self.layout)
        return batch.__dict__.copy()

    def _sequences(self, examples: Sequence[dict], name: str = "seqs", key: str = "response_ids") -> dict:
        """``{name: seqs}``, or ``{name + "_chunks": [seqs, ...]}`` when over ``max_tokens``."""
        if self.max_tokens is not None:
            groups = chunk_by_tokens([e["prompt_ids"] for e in examples],
                                     [e[key] if key == "response_ids" else [e[key]] for e in examples],
                                     self.layout, self.max_tokens)
            if len(groups) > 1:
                return {name + "_chunks": [self._seqs([examples[i] for i in g], key) for g in groups]}
        return {name: self._seqs(examples, key)}

    @staticmethod
    def _has(examples: Sequence[dict], key: str) -> bool:
        return all(key in e for e in examples)


@dataclass
class PairwiseCollator(_Collator):
    """Pairwise examples -> ``seqs`` (chosen = response 0, rejected = response 1) and
    ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` float64 when present (win-rates too)."""

    def __call__(self, examples: Sequence[dict]) -> dict:
        out: dict[str, Any] = self._sequences(examples)
        if self._has(examples, "ref_logps"):
            ref = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float64)
            out["ref_chosen_logps"], out["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        for name in ("chosen_winrate", "rejected_winrate"):
            if self._has(examples, name):
                out[name] = torch.tensor([e[name] for e in examples], dtype=torch.float64)
        return out


@dataclass
class ListwiseCollator(_Collator):
    """Listwise examples with K_b responses -> ``seqs`` with K = max K_b, ``scores``/``ref_logps``
    ``[B, K]`` (0 where padded) and ``mask`` ``[B, K]`` bool (False for padding responses)."""

    def __call__(self, examples: Sequence[dict]) -> dict:
        k = max(len(e["response_ids"]) for e in examples)
        mask = torch.tensor([[j < len(e["response_ids"]) for j in range(k)] for e in examples])

        def padded(key: str) -> torch.Tensor:
            return torch.tensor([list(e[key]) + [0.0] * (k - len(e[key])) for e in examples], dtype=torch.float64)

        out: dict[str, Any] = {**self._sequences(examples), "mask": mask, "scores": padded("scores")}
        if self._has(examples, "ref_logps"):
            out["ref_logps"] = padded("ref_logps")
        return out


@dataclass
class BinaryCollator(_Collator):
    """Binary examples -> ``seqs`` (K = 1), ``label`` ``[B]`` bool, ``ref_logps`` ``[B]``, and for
    KTO the mismatched pairs ``kl_seqs`` with ``ref_kl_logps`` ``[B]`` when present."""

    with_kl: bool = False

    def __call__(self, examples: Sequence[dict]) -> dict:
        out: dict[str, Any] = {**self._sequences(examples),
                               "label": torch.tensor([e["label"] for e in examples], dtype=torch.bool)}
        if self._has(examples, "ref_logps"):
            out["ref_logps"] = torch.tensor([e["ref_logps"][0] for e in examples], dtype=torch.float64)
        if self.with_kl:
            out.update(self._sequences(examples, "kl_seqs", "kl_response_ids"))
            if self._has(examples, "ref_kl_logps"):
                out["ref_kl_logps"] = torch.tensor([e["ref_kl_logps"] for e in examples], dtype=torch.float64)
        return out


@dataclass
class NegativesCollator(_Collator):
    """Negating Negatives examples (``trainers.negatives``: response 0 the negative, 1..K_b the
    samples) -> ``seqs`` with K = 1 + max K_b, ``ref_logps`` ``[B, K]`` (0 where padded) and
    ``sample_mask`` ``[B, K - 1]`` bool (False for padding samples)."""

    def __call__(self, examples: Sequence[dict]) -> dict:
        k = max(len(e["response_ids"]) for e in examples)
        mask = torch.tensor([[j < len(e["response_ids"]) for j in range(1, k)] for e in examples], dtype=torch.bool)
        out: dict[str, Any] = {"seqs": self._seqs(examples), "sample_mask": mask}
        if self._has(examples, "ref_logps"):
            out["ref_logps"] = torch.tensor([list(e["ref_logps"]) + [0.0] * (k - len(e["ref_logps"]))
                                             for e in examples], dtype=torch.float64)
        return out


def collator_for(kind: str, pad_token_id: int, layout: str = "packed", with_kl: bool = False,
                 max_tokens: int | None = None) -> _Collator:
    """The collator of a dataset kind (or of ``negatives``, the examples of loss ``nn``; ``max_tokens``:
    see ``_Collator``, per-sequence kinds only)."""
    if kind == "pairwise":
        return PairwiseCollator(pad_token_id, layout, max_tokens=max_tokens)
    if kind == "listwise":
        return ListwiseCollator(pad_token_id, layout, max_tokens=max_tokens)
    if kind == "binary":
        return BinaryCollator(pad_token_id, layout, with_kl, max_tokens=max_tokens)
    if kind == "negatives":
        return NegativesCollator(pad_token_id, layout)
    raise ValueError(f"no collator for kind {kind!r}; known: {', '.join(KINDS)}")
