"""Preference files of fine-tuning frameworks: LLaMA-Factory, axolotl and ShareGPT-style data.

Field names follow each project's own documentation and code (read 2026-12):

- LLaMA-Factory ``data/README.md`` and ``src/llamafactory/data/converter.py``: the alpaca
  ranking file (``instruction``, ``input``, ``chosen``, ``rejected``, optional ``system`` and
  ``history`` [[query, answer], ...]; the user turn is ``instruction\\ninput``); the sharegpt
  ranking file (``conversations`` of ``{from, value}``, ``from`` one of human / gpt /
  observation / function_call / system, and ``chosen`` / ``rejected`` single messages); the KTO
  file (``messages`` of ``{role, content}`` ending with the answer, ``label`` bool, as
  ``data/kto_en_demo.json``); and the v1 pair file (``chosen_messages`` / ``rejected_messages``,
  messages whose ``content`` is a list of ``{type, value}`` blocks, ``data/v1_dpo_demo.jsonl``).
  ``dataset_info.json`` can rename every column and tag: ``--fields`` takes the same keys
  (``messages=...``, ``chosen=...``, ``role_tag=...``, ``user_tag=...``, ...).
- axolotl ``src/axolotl/prompt_strategies/dpo/chatml.py`` and ``chat_template.py``, and
  ``docs/rlhf.qmd``: ``chatml.intel`` (system, question, chosen, rejected), ``chatml.argilla``
  (system, instruction, chosen_response, rejected_response; renamed ``chatml.default`` in the
  code), ``chatml.ultra`` (system, prompt, chosen and rejected as [user, assistant] lists) and
  ``chat_template.default`` (``messages`` + ``chosen`` / ``rejected``, each a message, a string
  or a list whose last message is the answer) with its options ``field_messages``,
  ``field_chosen``, ``field_rejected``, ``message_property_mappings`` (``role=``, ``content=``)
  and ``roles`` (``roles.user=human|...``), all taken by ``--fields``.
- ShareGPT preference rows as found in the wild: a conversation (``conversations`` or
  ``messages``) of ``{from, value}`` or ``{role, content}`` and ``chosen`` / ``rejected`` as a
  message, a string or a message list ending with the answer.

A message dict or list where text is expected is an error (never JSON text); a row whose roles
do not fit (an unknown role, an answer that is not the assistant's) is quarantined.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels.columns import Quarantine, col, one_message, require, same_messages, text
from alignflow.feedback.labels.errors import FieldTypeError, LabelsError
from alignflow.feedback.labels.formats import (
    Format,
    Parsed,
    ReadContext,
    _bool,
    _concat_lists,
    _finish,
    _pairwise,
    _rows,
    register,
)
from alignflow.schemas.kinds import MESSAGE, MESSAGES
from alignflow.schemas.prompts import prompt_ids

# role names -> canonical roles (system, user, assistant, tool)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function_response": "tool",
                  "ipython": "tool"}


# -- messages with any keys and role names -> canonical MESSAGES --------------------------------


class Shape:
    """How one file spells messages: the role and content keys and the role names."""

    def __init__(self, role_key: str, content_key: str, roles: dict[str, str]):
        self.role_key, self.content_key, self.roles = role_key, content_key, roles


def _struct_names(t: pa.DataType) -> list[str]:
    return [f.name for f in t] if pa.types.is_struct(t) else []


def _content_text(values: pa.Array, field: str) -> tuple[pa.Array, np.ndarray]:
    """Message contents -> text: strings as they are; a list of content blocks (``{type, value}``
    as LLaMA-Factory v1, ``{type, text}`` as OpenAI) joined when all are text. Returns the text
    and, per message, whether a block was not text (an image, a tool call: not readable here)."""
    t = values.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return values.cast(pa.string()), np.zeros(len(values), dtype=bool)
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
        names = _struct_names(t.value_type)
        key = "value" if "value" in names else "text" if "text" in names else None
        if key is None or "type" not in names:
            raise FieldTypeError(field, 0, f"content blocks need 'type' and 'value' (or 'text'); they have {', '.join(names)}")
        blocks = pc.list_flatten(values)
        kind = pc.struct_field(blocks, "type").cast(pa.string())
        body = text(pa.table({field: pc.struct_field(blocks, key)}), field)
        parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
        is_text = pc.fill_null(pc.equal(kind, "text"), False).to_numpy(zero_copy_only=False)
        other = np.zeros(len(values), dtype=bool)
        other[parents[~is_text]] = True
        kept = np.flatnonzero(is_text)
        sizes = np.bincount(parents[kept], minlength=len(values))
        offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
        joined = pc.binary_join(pa.ListArray.from_arrays(offsets, body.take(pa.array(kept))), "")
        return pc.if_else(values.is_null(), pa.scalar(None, pa.string()), joined), other
    return text(pa.table({field: values}), field), np.zeros(len(values), dtype=bool)


def _single(raw: pa.Table, name: str, shape: Shape, q: Quarantine) -> tuple[pa.Array, pa.Array]:
    """A column of single messages (structs) -> (canonical role, content text)."""
    c = col(raw, name)
    names = _struct_names(c.type)
    if shape.role_key not in names or shape.content_key not in names:
        raise FieldTypeError(name, 0, f"a message needs {shape.role_key!r} and {shape.content_key!r} "
                                      f"(it has {', '.join(names)}); name them with --fields")
    role = _mapped_roles(pc.struct_field(c, shape.role_key), shape, q, np.arange(len(c)), name)
    content, other = _content_text(pc.struct_field(c, shape.content_key), name)
    q.add(other, f"{name}: content that is not text (images, tool calls)")
    q.add(c.is_null().to_numpy(zero_copy_only=False), f"null {name}")
    return role, content


def _mapped_roles(roles: pa.Array, shape: Shape, q: Quarantine, rows: np.ndarray, field: str) -> pa.Array:
    """Role names -> canonical roles; a row with a name the shape does not know is quarantined."""
    roles = text(pa.table({field + ".role": roles}), field + ".role")
    keys = pa.array(list(shape.roles), pa.string())
    index = pc.index_in(roles, value_set=keys)
    mapped = pa.array(list(shape.roles.values()), pa.string()).take(index)
    unknown = pc.is_null(index).to_numpy(zero_copy_only=False)
    if unknown.any():
        bad = np.zeros(q.bad.shape[0], dtype=bool)
        bad[rows[unknown]] = True
        first = roles[int(np.flatnonzero(unknown)[0])].as_py()
        q.add(bad, f"{field}: unknown role {first!r} (known: {', '.join(shape.roles)}; map others with --fields)")
    return mapped


def messages_of(raw: pa.Table, name: str, shape: Shape, q: Quarantine) -> pa.Array:
    """A column of message lists (any role/content keys) -> canonical MESSAGES (null -> empty)."""
    c = col(raw, name)
    t = c.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):  # a plain prompt: one user turn
        return one_message(text(raw, name), role="user")
    if not ((pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)):
        if pa.types.is_null(t) or (pa.types.is_list(t) and pa.types.is_null(t.value_type)):
            q.add(np.ones(len(c), dtype=bool), f"no messages in {name}")
            return pa.array([[]] * len(c), MESSAGES)
        valid = np.flatnonzero(c.is_valid().to_numpy(zero_copy_only=False))
        raise FieldTypeError(name, int(valid[0]) if len(valid) else 0, f"expected a list of messages, got {t}")
    names = _struct_names(t.value_type)
    if shape.role_key not in names or shape.content_key not in names:
        raise FieldTypeError(name, 0, f"messages need {shape.role_key!r} and {shape.content_key!r} "
                                      f"(they have {', '.join(names)}); name them with --fields")
    flat = pc.list_flatten(c)
    parents = pc.list_parent_indices(c).to_numpy(zero_copy_only=False)
    try:  # the helpers see the messages of all rows flattened: name the row that holds the bad one
        role = _mapped_roles(pc.struct_field(flat, shape.role_key), shape, q, parents, name)
        content, other = _content_text(pc.struct_field(flat, shape.content_key), name)
    except FieldTypeError as exc:
        raise FieldTypeError(exc.field, int(parents[exc.row]), exc.what) from None
    if other.any():
        bad = np.zeros(len(c), dtype=bool)
        bad[parents[other]] = True
        q.add(bad, f"{name}: content that is not text (images, tool calls)")
    lengths = pc.list_value_length(c).fill_null(0).to_numpy(zero_copy_only=False)
    q.add(c.is_null().to_numpy(zero_copy_only=False), f"null {name}")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([role, content], fields=list(MESSAGE)),
                                    type=MESSAGES)


def _last(messages: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray]:
    """(all but the last message, last role, last content, has a message)."""
    lengths = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(lengths)
    has = lengths > 0
    flat = pc.list_flatten(messages)
    if len(flat) == 0:
        empty = pa.nulls(len(lengths), pa.string())
        return pa.array([[]] * len(lengths), MESSAGES), empty, empty, has
    last = flat.take(pa.array(np.where(has, ends - 1, 0)))
    role = pc.if_else(pa.array(has), pc.struct_field(last, "role"), pa.scalar(None, pa.string()))
    content = pc.if_else(pa.array(has), pc.struct_field(last, "content"), pa.scalar(None, pa.string()))
    keep = np.ones(len(flat), dtype=bool)
    keep[(ends - 1)[has]] = False
    rest_len = np.maximum(lengths - 1, 0)
    rest = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(rest_len)]).astype(np.int32)),
                                    flat.filter(pa.array(keep)), type=MESSAGES)
    return rest, role, content, has


def _is(values: pa.Array, role: str | tuple[str, ...]) -> np.ndarray:
    roles = (role,) if isinstance(role, str) else role
    return pc.fill_null(pc.is_in(values, pa.array(list(roles), pa.string())), False).to_numpy(zero_copy_only=False)


def _answer(raw: pa.Table, name: str, shape: Shape, q: Quarantine, prompt: pa.Array | None) -> pa.Array:
    """A chosen / rejected column -> the answer's text. A string is the answer; a message must be
    the assistant's; a message list ends with the answer and, when longer than one message and
    ``prompt`` is given, must begin with that prompt."""
    c = col(raw, name)
    t = c.type
    if pa.types.is_struct(t):
        role, content = _single(raw, name, shape, q)
        q.add(~_is(role, "assistant"), f"{name} is not an assistant message")
        return content
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
        msgs = messages_of(raw, name, shape, q)
        rest, role, content, has = _last(msgs)
        q.add(~has, f"empty {name}")
        q.add(~_is(role, "assistant"), f"{name} does not end with an assistant message")
        if prompt is not None:
            longer = pc.list_value_length(rest).fill_null(0).to_numpy(zero_copy_only=False) > 0
            q.add(longer & ~same_messages(rest, prompt), f"{name} continues another conversation than the prompt")
        return content
    return text(raw, name)


def _with_system(raw: pa.Table, name: str | None, prompt: pa.Array) -> pa.Array:
    """``[system] + prompt`` where a system column has text (null or empty: no system turn)."""
    if name is None or name not in raw.column_names:
        return prompt
    system = text(raw, name)
    has = pc.fill_null(pc.greater(pc.utf8_length(system), 0), False)
    sys_msgs = one_message(pc.fill_null(system, ""), role="system")
    empty = pa.array([[]] * len(system), MESSAGES)
    return _concat_lists(pc.if_else(has, sys_msgs, empty), prompt)


def _fields(ctx: ReadContext, fmt: Format, defaults: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(ctx.fields) - set(fmt.fields))
    if unknown:
        raise LabelsError(f"--fields: {', '.join(unknown)} not known to {fmt.name} (it takes: {', '.join(fmt.fields)})")
    return {**defaults, **ctx.fields}



def _check_answers(q: Quarantine, prompt: pa.Array) -> None:
    """The answers reply to the prompt's last turn: it must be the user's (or a tool result)."""
    q.add(~_is(_last(prompt)[1], ("user", "tool")), "the prompt does not end with a user turn")


# -- LLaMA-Factory --------------------------------------------------------------------------

LF_FIELDS = ("prompt", "query", "history", "messages", "system", "chosen", "rejected", "kto_tag", "response",
             "role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")


def _lf_shape(f: dict[str, str], messages_type: pa.DataType) -> Shape:
    """LLaMA-Factory's tags: ``from``/``value`` with human/gpt (sharegpt) unless the messages
    use ``role``/``content`` (the openai style of its README, and its KTO demo)."""
    names = _struct_names(messages_type.value_type) if pa.types.is_list(messages_type) else []
    openai = "role" in names and "content" in names and "role_tag" not in f
    role_key = f.get("role_tag", "role" if openai else "from")
    content_key = f.get("content_tag", "content" if openai else "value")
    tags = {f.get("user_tag", "user" if openai else "human"): "user",
            f.get("assistant_tag", "assistant" if openai else "gpt"): "assistant",
            f.get("observation_tag", "tool" if openai else "observation"): "tool",
            f.get("function_tag", "function_call"): "assistant",
            f.get("system_tag", "system"): "system"}
    return Shape(role_key, content_key, tags)


def read_llamafactory(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """LLaMA-Factory preference data: sharegpt ranking (``conversations`` + ``chosen`` /
    ``rejected`` messages), alpaca ranking (``instruction``, ``input``, ``chosen``, ``rejected``,
    optional ``system``, ``history``) or the v1 pair file (``chosen_messages`` /
    ``rejected_messages``). Which one is told by the columns."""
    f = _fields(ctx, FORMATS_LF, {})
    q = Quarantine(raw, ctx.row_offset)
    if "chosen_messages" in raw.column_names and "messages" not in f:
        return _read_lf_v1(raw, ctx, q)
    messages = f.get("messages") or next((c for c in ("conversations", "messages") if c in raw.column_names), None)
    chosen_name, rejected_name = f.get("chosen", "chosen"), f.get("rejected", "rejected")
    if messages is not None and messages in raw.column_names:
        require(raw, [chosen_name, rejected_name], ctx)
        shape = _lf_shape(f, col(raw, messages).type)
        prompt = _with_system(raw, f.get("system", "system"), messages_of(raw, messages, shape, q))
        _check_answers(q, prompt)
        chosen = _answer(raw, chosen_name, shape, q, None)
        rejected = _answer(raw, rejected_name, shape, q, None)
        return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)
    prompt = _lf_alpaca_prompt(raw, ctx, f, q)
    require(raw, [chosen_name, rejected_name], ctx)
    chosen, rejected = text(raw, chosen_name), text(raw, rejected_name)
    return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)


def _lf_alpaca_prompt(raw: pa.Table, ctx: ReadContext, f: dict[str, str], q: Quarantine) -> pa.Array:
    """``history`` turns, then ``instruction\\ninput`` (each only when not empty), after ``system``."""
    prompt_name, query_name = f.get("prompt", "instruction"), f.get("query", "input")
    require(raw, [prompt_name], ctx)
    parts = [pc.fill_null(text(raw, n), "") for n in (prompt_name, query_name) if n in raw.column_names]
    if len(parts) == 2:
        both = pc.and_(pc.greater(pc.utf8_length(parts[0]), 0), pc.greater(pc.utf8_length(parts[1]), 0))
        user = pc.if_else(both, pc.binary_join_element_wise(parts[0], parts[1], "\n"),
                          pc.binary_join_element_wise(parts[0], parts[1], ""))
    else:
        user = parts[0]
    prompt = one_message(user, role="user")
    history = f.get("history", "history")
    if history in raw.column_names:
        prompt = _concat_lists(_history_turns(raw, history, q), prompt)
    return _with_system(raw, f.get("system", "system"), prompt)


def _history_turns(raw: pa.Table, name: str, q: Quarantine) -> pa.Array:
    """``[[query, answer], ...]`` -> alternating user / assistant messages."""
    c = col(raw, name)
    t = c.type
    if pa.types.is_null(t):
        return pa.array([[]] * len(c), MESSAGES)
    if not (pa.types.is_list(t) and pa.types.is_list(t.value_type)):
        valid = np.flatnonzero(c.is_valid().to_numpy(zero_copy_only=False))
        raise FieldTypeError(name, int(valid[0]) if len(valid) else 0, f"expected [[query, answer], ...], got {t}")
    pairs = pc.list_flatten(c)
    pair_len = pc.list_value_length(pairs).fill_null(0).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(c).to_numpy(zero_copy_only=False)
    bad = np.zeros(len(c), dtype=bool)
    bad[parents[pair_len != 2]] = True
    q.add(bad, f"{name}: an entry is not a [query, answer] pair")
    turns = text(pa.table({name: pc.list_flatten(pairs)}), name)
    pair_of = pc.list_parent_indices(pairs).to_numpy(zero_copy_only=False)
    in_pair = np.arange(len(turns)) - np.concatenate([[0], np.cumsum(pair_len)[:-1]])[pair_of]
    roles = pa.array(np.where(in_pair % 2 == 0, "user", "assistant").astype(object), pa.string())
    per_row = np.bincount(parents, weights=pair_len, minlength=len(c)).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([roles, turns], fields=list(MESSAGE)), type=MESSAGES)


def _read_lf_v1(raw: pa.Table, ctx: ReadContext, q: Quarantine) -> Parsed:
    """v1 pairs: two whole conversations sharing all but the last (assistant) message."""
    require(raw, ["chosen_messages", "rejected_messages"], ctx)
    shape = Shape("role", "content", {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"})
    prompt_c, role_c, chosen, has_c = _last(messages_of(raw, "chosen_messages", shape, q))
    prompt_r, role_r, rejected, has_r = _last(messages_of(raw, "rejected_messages", shape, q))
    q.add(~(has_c & has_r), "empty chosen_messages or rejected_messages")
    q.add(~(_is(role_c, "assistant") & _is(role_r, "assistant")), "a conversation does not end with an assistant message")
    q.add(~same_messages(prompt_c, prompt_r), "chosen_messages and rejected_messages differ before the answer")
    return _finish("pairwise", _pairwise(prompt_c, chosen, rejected, ctx), q)


def read_llamafactory_kto(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """LLaMA-Factory KTO data: a conversation ending with the answer (``messages`` /
    ``conversations``) and a bool tag (``label`` as its demo file, or ``kto_tag``); the alpaca
    form (``instruction``, ``input``, ``output`` + the tag) too."""
    f = _fields(ctx, FORMATS_LF_KTO, {})
    q = Quarantine(raw, ctx.row_offset)
    tag = f.get("kto_tag") or next((c for c in ("label", "kto_tag") if c in raw.column_names), "label")
    messages = f.get("messages") or next((c for c in ("messages", "conversations") if c in raw.column_names), None)
    if messages is not None and messages in raw.column_names:
        require(raw, [tag], ctx)
        shape = _lf_shape(f, col(raw, messages).type)
        conv = _with_system(raw, f.get("system", "system"), messages_of(raw, messages, shape, q))
        prompt, role, response, has = _last(conv)
        q.add(~has, f"empty {messages}")
        q.add(~_is(role, "assistant"), f"{messages} does not end with an assistant message")
    else:
        response_name = f.get("response", "output")
        require(raw, [response_name, tag], ctx)
        prompt = _lf_alpaca_prompt(raw, ctx, f, q)
        response = text(raw, response_name)
    label = _bool(col(raw, tag))
    q.add(label < 0, f"{tag} not true/false")
    table = pa.table({"prompt_id": prompt_ids(prompt), "prompt": prompt, "response": response,
                      "label": pa.array(label == 1), "_row": _rows(ctx, len(raw)),
                      "_nrec": pa.array(np.ones(len(raw), np.int64))})
    return _finish("binary", table, q)


def _sharegpt_messages(prompt: pa.Array, answer: pa.Array | None = None) -> pa.Array:
    """Canonical messages (+ a final answer) -> ``[{from, value}]`` with sharegpt's role names."""
    if answer is not None:
        prompt = _concat_lists(prompt, one_message(answer))
    flat = pc.list_flatten(prompt)
    names = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}
    role = pc.struct_field(flat, "role")
    tag = pa.array(list(names.values()), pa.string()).take(pc.index_in(role, value_set=pa.array(list(names))))
    structs = pa.StructArray.from_arrays([tag, pc.struct_field(flat, "content")], names=["from", "value"])
    lengths = pc.list_value_length(prompt).to_numpy(zero_copy_only=False)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), structs)


def _one_sharegpt(answer: pa.Array) -> pa.Array:
    return pa.StructArray.from_arrays([pa.array(["gpt"] * len(answer), pa.string()), answer.cast(pa.string())],
                                      names=["from", "value"])


def _single_turn(prompt: pa.Array, fmt: str) -> tuple[pa.Array, pa.Array]:
    """(system text or null, user text) of prompts that are [system?] + one user turn; else an error."""
    lengths = pc.list_value_length(prompt).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(prompt)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    role = pc.struct_field(flat, "role").to_numpy(zero_copy_only=False)
    content = pc.struct_field(flat, "content")
    has_system = (lengths == 2) & (role[np.minimum(starts, max(len(role) - 1, 0))] == "system") if len(role) else \
        np.zeros(len(lengths), dtype=bool)
    ok = (lengths == 1) | has_system
    user_at = np.where(has_system, starts + 1, starts)
    if len(role):
        ok &= role[np.minimum(user_at, len(role) - 1)] == "user"
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise LabelsError(f"row {row}: {fmt} holds one user turn (and a system prompt); this prompt has "
                          f"{int(lengths[row])} turns: export to llamafactory, sharegpt or axolotl-chat_template")
    system = pc.if_else(pa.array(has_system), content.take(pa.array(np.where(has_system, starts, 0))),
                        pa.scalar(None, pa.string()))
    return system, content.take(pa.array(user_at))


def export_llamafactory(table: pa.Table, options: dict) -> pa.Table:
    """``--style sharegpt`` (default: ``conversations`` + ``chosen``/``rejected`` messages, the
    system prompt as a leading ``system`` message), ``alpaca`` (single user turn: instruction,
    chosen, rejected, system) or ``v1`` (``chosen_messages`` / ``rejected_messages``)."""
    style = options.get("style") or "sharegpt"
    prompt, chosen, rejected = col(table, "prompt"), col(table, "chosen"), col(table, "rejected")
    if style == "sharegpt":
        return pa.table({"conversations": _sharegpt_messages(prompt), "chosen": _one_sharegpt(chosen),
                         "rejected": _one_sharegpt(rejected)})
    if style == "alpaca":
        system, user = _single_turn(prompt, "the alpaca style")
        out = {"instruction": user, "input": pa.array([""] * len(user), pa.string()), "chosen": chosen, "rejected": rejected}
        if system.null_count < len(system):
            out["system"] = pc.fill_null(system, "")
        return pa.table(out)
    if style == "v1":
        return pa.table({"chosen_messages": _v1_messages(prompt, chosen), "rejected_messages": _v1_messages(prompt, rejected)})
    raise LabelsError(f"unknown --style {style!r} for llamafactory (sharegpt, alpaca, v1)")


def _v1_messages(prompt: pa.Array, answer: pa.Array) -> pa.Array:
    conv = _concat_lists(prompt, one_message(answer))
    flat = pc.list_flatten(conv)
    content = pc.struct_field(flat, "content")
    blocks = pa.StructArray.from_arrays([pa.array(["text"] * len(content), pa.string()), content], names=["type", "value"])
    content_lists = pa.ListArray.from_arrays(pa.array(np.arange(len(content) + 1, dtype=np.int32)), blocks)
    role = pc.struct_field(flat, "role")
    lengths = pc.list_value_length(conv).to_numpy(zero_copy_only=False)
    # only the final answer is trained on (loss_weight 1), as LLaMA-Factory's pair converter does for assistant turns
    last = np.zeros(len(flat), dtype=bool)
    last[np.cumsum(lengths)[lengths > 0] - 1] = True
    weight = pa.array(np.where(last, 1.0, 0.0))
    msgs = pa.StructArray.from_arrays([role, content_lists, weight], names=["role", "content", "loss_weight"])
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), msgs)


def export_llamafactory_kto(table: pa.Table, options: dict) -> pa.Table:
    """``messages`` (``{role, content}``, the answer last) and ``label``, as ``kto_en_demo.json``."""
    conv = _concat_lists(col(table, "prompt"), one_message(col(table, "response")))
    return pa.table({"messages": conv, "label": col(table, "label")})


# -- axolotl ---------------------------------------------------------------------------------


def _axolotl_chatml(prompt_field: str, chosen_field: str, rejected_field: str, lists: bool = False):
    def read(raw: pa.Table, ctx: ReadContext) -> Parsed:
        require(raw, [prompt_field, chosen_field, rejected_field], ctx)
        q = Quarantine(raw, ctx.row_offset)
        prompt = _with_system(raw, "system", one_message(text(raw, prompt_field), role="user"))
        shape = Shape("role", "content", {"user": "user", "assistant": "assistant", "system": "system"})
        if lists:  # chatml.ultra: the answer is the last message of a [user, assistant] list
            chosen = _answer(raw, chosen_field, shape, q, None)
            rejected = _answer(raw, rejected_field, shape, q, None)
        else:
            chosen, rejected = text(raw, chosen_field), text(raw, rejected_field)
        return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)

    read.__doc__ = (f"axolotl chatml: optional ``system``, ``{prompt_field}`` (one user turn), ``{chosen_field}`` and "
                    f"``{rejected_field}``" + (" as [user, assistant] message lists." if lists else " as text."))
    return read


def _export_axolotl_chatml(prompt_field: str, chosen_field: str, rejected_field: str, lists: bool = False):
    def export(table: pa.Table, options: dict) -> pa.Table:
        system, user = _single_turn(col(table, "prompt"), f"axolotl's {prompt_field} field")
        chosen, rejected = col(table, "chosen"), col(table, "rejected")
        if lists:
            user_msg = one_message(user, role="user")
            chosen, rejected = (_concat_lists(user_msg, one_message(chosen)), _concat_lists(user_msg, one_message(rejected)))
        out = {prompt_field: user, chosen_field: chosen, rejected_field: rejected}
        if system.null_count < len(system):
            out = {"system": pc.fill_null(system, ""), **out}
        return pa.table(out)

    return export


AXOLOTL_FIELDS = ("field_messages", "field_chosen", "field_rejected", "role", "content", "message_field_role",
                  "message_field_content", "roles.user", "roles.assistant", "roles.system", "roles.tool")


def read_axolotl_chat_template(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """axolotl ``chat_template.default``: ``messages`` (a list, or a string = one user turn) and
    ``chosen`` / ``rejected`` (a message, a string, or a list whose last message is the answer).
    ``--fields`` takes axolotl's options: ``field_messages=``, ``field_chosen=``,
    ``field_rejected=``, ``role=`` / ``content=`` (message_property_mappings; the legacy
    ``message_field_role`` / ``message_field_content`` too) and ``roles.user=human|user``, ..."""
    f = _fields(ctx, FORMATS_AXOLOTL_CT, {})
    messages, chosen_name, rejected_name = (f.get("field_messages", "messages"), f.get("field_chosen", "chosen"),
                                            f.get("field_rejected", "rejected"))
    require(raw, [messages, chosen_name, rejected_name], ctx)
    roles: dict[str, str] = {}
    for target in ("user", "assistant", "system", "tool"):
        for source in f.get(f"roles.{target}", target).split("|"):
            roles[source.strip()] = target
    shape = Shape(f.get("role", f.get("message_field_role", "role")),
                  f.get("content", f.get("message_field_content", "content")), roles)
    q = Quarantine(raw, ctx.row_offset)
    prompt = messages_of(raw, messages, shape, q)
    _check_answers(q, prompt)
    chosen = _answer(raw, chosen_name, shape, q, prompt)
    rejected = _answer(raw, rejected_name, shape, q, prompt)
    return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)


def export_axolotl_chat_template(table: pa.Table, options: dict) -> pa.Table:
    """``messages`` (the prompt) + ``chosen`` / ``rejected`` assistant messages."""
    return pa.table({"messages": col(table, "prompt"), "chosen": pc.list_flatten(one_message(col(table, "chosen"))),
                     "rejected": pc.list_flatten(one_message(col(table, "rejected")))})


# -- generic ShareGPT preference ------------------------------------------------------------


def read_sharegpt(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """ShareGPT preference rows: a conversation (``conversations`` or ``messages``) of
    ``{from, value}`` or ``{role, content}`` messages ending with the user's turn, and
    ``chosen`` / ``rejected`` as a message, a string or a message list ending with the answer
    (a longer list must begin with the conversation). Role names: human/user, gpt/assistant
    (chatgpt, bard, bing, model), system, observation/tool (function_response, ipython);
    function_call is an assistant turn."""
    q = Quarantine(raw, ctx.row_offset)
    f = _fields(ctx, FORMATS_SHAREGPT, {})
    messages = f.get("messages") or next((c for c in ("conversations", "messages", "conversation")
                                          if c in raw.column_names), "conversations")
    chosen_name, rejected_name = f.get("chosen", "chosen"), f.get("rejected", "rejected")
    require(raw, [messages, chosen_name, rejected_name], ctx)
    names = _struct_names(col(raw, messages).type.value_type) if pa.types.is_list(col(raw, messages).type) else []
    keys = ("from", "value") if "from" in names else ("role", "content")
    shape = Shape(f.get("role_tag", keys[0]), f.get("content_tag", keys[1]), SHAREGPT_ROLES)
    prompt = _with_system(raw, f.get("system", "system"), messages_of(raw, messages, shape, q))
    _check_answers(q, prompt)
    chosen = _answer(raw, chosen_name, shape, q, prompt)
    rejected = _answer(raw, rejected_name, shape, q, prompt)
    return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)


def export_sharegpt(table: pa.Table, options: dict) -> pa.Table:
    """``conversations`` of ``{from, value}`` + ``chosen`` / ``rejected`` messages."""
    return export_llamafactory(table, {"style": "sharegpt"})


# -- the registry ------------------------------------------------------------------------------

FORMATS_LF = register(Format(
    "llamafactory", "pairwise", "pairwise; LLaMA-Factory ranking data: sharegpt (conversations + chosen/rejected "
    "messages), alpaca (instruction, input, chosen, rejected, system, history) or v1 (chosen_messages/"
    "rejected_messages); --fields as dataset_info.json; export --style sharegpt|alpaca|v1",
    read_llamafactory, export_llamafactory, source=None, fields=LF_FIELDS))
FORMATS_LF_KTO = register(Format(
    "llamafactory-kto", "binary", "binary (KTO); LLaMA-Factory: messages ending with the answer + label (kto_tag), "
    "or alpaca instruction/input/output + tag", read_llamafactory_kto, export_llamafactory_kto, source=None,
    fields=LF_FIELDS))
for _name, _args, _holds in (
        ("axolotl-chatml.intel", ("question", "chosen", "rejected"), "system, question, chosen, rejected"),
        ("axolotl-chatml.argilla", ("instruction", "chosen_response", "rejected_response"),
         "system, instruction, chosen_response, rejected_response"),
        ("axolotl-chatml.ultra", ("prompt", "chosen", "rejected", True),
         "system, prompt, chosen/rejected as [user, assistant] lists")):
    register(Format(_name, "pairwise", f"pairwise; axolotl DPO type {_name.removeprefix('axolotl-')}: {_holds} "
                    "(one user turn)", _axolotl_chatml(*_args), _export_axolotl_chatml(*_args), source=None))
FORMATS_AXOLOTL_CT = register(Format(
    "axolotl-chat_template", "pairwise", "pairwise; axolotl chat_template.default: messages + chosen/rejected "
    "(message, text or list); --fields field_messages=, field_chosen=, field_rejected=, role=, content=, roles.user=...",
    read_axolotl_chat_template, export_axolotl_chat_template, source=None, fields=AXOLOTL_FIELDS))
FORMATS_SHAREGPT = register(Format(
    "sharegpt", "pairwise", "pairwise; ShareGPT preference: conversations ({from, value} or {role, content}) + "
    "chosen/rejected (message, text or list)", read_sharegpt, export_sharegpt, source=None,
    fields=("messages", "chosen", "rejected", "system", "role_tag", "content_tag")))
