"""Prompts that fit the model's context, and the model's control strings.

A generator may know its context length (``context_length``): ``hf`` from the model config's
``max_position_embeddings`` (else the tokenizer's ``model_max_length``), ``vllm`` from the
engine's ``max_model_len``, ``openai`` from the server's ``/v1/models`` (vLLM reports
``max_model_len``), else the user's ``--context-length``, else the tokenizer if one is given.
Unknown: prompts are sent as they are.

Judges, critique-revision and generation build prompts around pieces of text they do not
control (the request, the candidate responses). ``PromptFitter.fit`` makes such a prompt fit by
one documented rule:

* the prompt is measured as the model sees it: the generator's own tokenization where it has
  one (chat template applied), else the tokenizer's chat template, else the UTF-8 bytes of the
  messages plus ``MESSAGE_OVERHEAD`` tokens per message (no tokenizer yields more tokens than
  bytes);
* ``reserve`` tokens stay free for what the model produces (answer tokens, ``max_new_tokens``);
* if it does not fit, every piece keeps its head, the pieces sharing the room the template
  leaves equally (a piece shorter than its share keeps all of it and leaves the rest to the
  others); a cut piece ends with ``TRUNCATED_MARKER``; ``fitter.truncated`` counts the prompts
  cut (judges report it);
* if the template alone (every piece empty) leaves no room, ``ContextTooSmall`` is raised
  before any request is sent: one line naming both numbers.

``control_strings(tokenizer)`` lists the strings a candidate must not be able to spell inside a
judge prompt: the tokenizer's special tokens, the chat template's own scaffolding (``[INST]``,
``<|im_start|>``, ``<|start_header_id|>`` ...) and well-known control strings of common template
families (``feedback.judges.templates.quote`` escapes them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

Messages = list[dict]

TRUNCATED_MARKER = " [...truncated]"
MESSAGE_OVERHEAD = 32  # tokens a chat template may add per message, when there is no tokenizer to ask
UNBOUNDED = 1_000_000  # a tokenizer's model_max_length above this means "not set"

# Control strings of common chat-template families, escaped even when the judge's tokenizer is
# not at hand (an OpenAI-compatible server without --tokenizer). Those with < or > are escaped by
# quoting already; the bracketed ones are plain text to a tokenizer that lacks them.
KNOWN_CONTROL_STRINGS = (
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
)


class ContextTooSmall(ValueError):
    """The prompt's fixed part (template, instructions) alone exceeds the model's context."""


def tokenizer_of(generator: Any) -> Any:
    """The generator's tokenizer when it has one at hand (``hf``, ``vllm``; ``openai`` with
    ``tokenizer=``); None otherwise. A named tokenizer of the ``openai`` backend is loaded here."""
    tokenizer = getattr(generator, "tokenizer", None) if getattr(generator, "_tokenizer", True) is not None else None
    return tokenizer if hasattr(tokenizer, "encode") or hasattr(tokenizer, "apply_chat_template") else None


def context_of(generator: Any) -> int | None:
    value = getattr(generator, "context_length", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def tokenizer_context(tokenizer: Any) -> int | None:
    """A tokenizer's ``model_max_length`` when it was set (transformers uses a huge placeholder)."""
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < UNBOUNDED else None


def _render(tokenizer: Any, messages: Messages) -> str:
    from alignflow.feedback.judges.scoring import render_chat

    return render_chat(tokenizer, messages)


def _split_waterfill(lengths: Sequence[int], room: int) -> int:
    """The largest share s with sum(min(length, s)) <= room (pieces shorter than s keep all)."""
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class PromptFitter:
    """Fits prompts into ``context`` tokens by the module's rule; counts what it cut."""

    context: int | None
    count_messages: Callable[[Messages, int], int]  # (messages, limit): exact once above the limit
    count_text: Callable[[str], int]
    head: Callable[[str, int], str]
    truncated: int = 0
    what: str = "prompt"

    def fits(self, messages: Messages, reserve: int) -> bool:
        return self.context is None or self.count_messages(messages, self.context - reserve) + reserve <= self.context

    def fit(self, build: Callable[[Sequence[str]], Messages], pieces: Sequence[str], reserve: int = 0) -> list[str]:
        """``pieces`` (cut by the rule where needed) such that ``build(pieces)`` plus ``reserve``
        tokens fits the context."""
        pieces = list(pieces)
        if self.context is None or self.fits(build(pieces), reserve):
            return pieces
        fixed = self.count_messages(build([""] * len(pieces)), 0) + reserve
        marker = self.count_text(TRUNCATED_MARKER)
        room = self.context - fixed
        if room < len(pieces) * (marker + 1):
            raise ContextTooSmall(f"the {self.what} needs {fixed} tokens before any text of its own (template, "
                                  f"instructions, {reserve} tokens for the answer) but the model's context is "
                                  f"{self.context} tokens")
        lengths = [self.count_text(p) for p in pieces]
        for _ in range(8):  # tokens of a whole prompt are not quite the sum of its parts: re-measure
            share = _split_waterfill(lengths, room - marker * len(pieces))
            cut = [p if n <= share else self.head(p, max(1, share)) + TRUNCATED_MARKER
                   for p, n in zip(pieces, lengths)]
            over = self.count_messages(build(cut), self.context - reserve) + reserve - self.context
            if over <= 0:
                self.truncated += 1
                return cut
            room -= max(over, 1)
            if room < len(pieces) * (marker + 1):
                break
        raise ContextTooSmall(f"the {self.what} does not fit the model's context of {self.context} tokens even with "
                              "its texts cut to a few tokens each")


def fitter_for(generator: Any, what: str = "prompt") -> PromptFitter:
    """A ``PromptFitter`` measuring prompts the way ``generator``'s model sees them."""
    context = context_of(generator)
    tokenizer = tokenizer_of(generator) if context is not None else None
    if tokenizer is None:
        def count_messages(messages: Messages, limit: int) -> int:
            return sum(len(m["content"].encode("utf-8")) + MESSAGE_OVERHEAD for m in messages) + MESSAGE_OVERHEAD

        def count_text(text: str) -> int:
            return len(text.encode("utf-8"))

        def head(text: str, n: int) -> str:
            return text.encode("utf-8")[:n].decode("utf-8", errors="ignore")

        return PromptFitter(context, count_messages, count_text, head, what=what)

    own = getattr(generator, "prompt_ids", None)  # the hf backend's own rendering of a prompt

    def count_messages(messages: Messages, limit: int) -> int:
        text = _render(tokenizer, messages)
        if len(text.encode("utf-8")) + 4 <= limit:  # tokens <= bytes (+ a BOS): no need to tokenize
            return len(text.encode("utf-8")) + 4
        ids = own(messages) if callable(own) else tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + 16  # slack: a scorer renders a template-less prompt with role names

    def count_text(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def head(text: str, n: int) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
        return tokenizer.decode(ids, skip_special_tokens=False).replace("\ufffd", "")

    return PromptFitter(context, count_messages, count_text, head, what=what)


# --- control strings ------------------------------------------------------------------------------

_PROBES = ("\x01alignflow-probe-a\x01", "\x01alignflow-probe-b\x01", "\x01alignflow-probe-c\x01",
           "\x01alignflow-probe-d\x01")


def _template_scaffolding(tokenizer: Any, specials: set[str]) -> set[str]:
    """Non-word strings a chat template writes around the messages (e.g. "[INST]", "[/INST]")."""
    conversations = (
        [{"role": "system", "content": _PROBES[0]}, {"role": "user", "content": _PROBES[1]},
         {"role": "assistant", "content": _PROBES[2]}, {"role": "user", "content": _PROBES[3]}],
        [{"role": "user", "content": _PROBES[1]}, {"role": "assistant", "content": _PROBES[2]},
         {"role": "user", "content": _PROBES[3]}],
    )
    found: set[str] = set()
    for messages in conversations:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates raise on roles they do not take (e.g. system)
            continue
        for piece in re.split("|".join(map(re.escape, _PROBES)), text):
            for special in sorted(specials, key=len, reverse=True):
                piece = piece.replace(special, " ")
            found.update(w for w in piece.split() if len(w) > 1 and re.search(r"[^\w]", w))
    return found


def control_strings(tokenizer: Any = None) -> tuple[str, ...]:
    """Strings that candidate text must not spell inside a judge prompt (longest first)."""
    found = set(KNOWN_CONTROL_STRINGS)
    if tokenizer is not None:
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", []) or []}
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials |= {getattr(t, "content", str(t)) for t in decoder.values() if getattr(t, "special", False)}
        found |= specials
        if getattr(tokenizer, "chat_template", None):
            found |= _template_scaffolding(tokenizer, specials)
    return tuple(sorted((s for s in found if s.strip()), key=lambda s: (-len(s), s)))


def fit_conversation(fitter: PromptFitter, messages: Messages, reserve: int, tail: Sequence[dict] = ()) -> Messages:
    """``messages`` with their contents cut by the rule so that they, the fixed ``tail`` messages
    (instructions that follow) and ``reserve`` tokens fit the context."""
    def build(pieces: Sequence[str]) -> Messages:
        return [dict(m, content=p) for m, p in zip(messages, pieces)] + list(tail)

    cut = fitter.fit(build, [m["content"] for m in messages], reserve)
    return [dict(m, content=p) for m, p in zip(messages, cut)]
