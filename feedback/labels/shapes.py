"""Which label format a file looks like, from its columns and the types of their values.

Used for hints only (never to pick a reader silently): when ``--from`` names a format whose
reader fails, or converts nothing, the error says which format the file's shape matches.
Each shape is a test over the raw table's column names and value types; the first match wins,
so more specific shapes come first.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa


def _kind(table: pa.Table, name: str) -> str | None:
    """'text', 'number', 'bool', 'message' (a struct with role/content or from/value),
    'messages' (a list of those), 'texts', 'list', 'object'; None when absent or all null."""
    if name not in table.column_names:
        return None
    t = table.schema.field(name).type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_struct(t):
        return "message" if _is_message(t) else "object"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        v = t.value_type
        if pa.types.is_struct(v):
            return "messages" if _is_message(v) else "objects"
        if pa.types.is_string(v) or pa.types.is_large_string(v):
            return "texts"
        return "list"
    return None


def _is_message(t: pa.StructType) -> bool:
    names = {f.name for f in t}
    return {"role", "content"} <= names or {"from", "value"} <= names


def _has(*names: str) -> Callable[[pa.Table], bool]:
    return lambda t: all(n in t.column_names for n in names)


def _hh(table: pa.Table) -> bool:
    if _kind(table, "chosen") != "text" or _kind(table, "rejected") != "text" or "prompt" in table.column_names:
        return False
    first = table.column("chosen").drop_null()
    return len(first) > 0 and "\n\nAssistant:" in (first[0].as_py() or "")


# (format, test) in order: the first that matches names the format.
SHAPES: list[tuple[str, Callable[[pa.Table], bool]]] = [
    ("llamafactory", _has("chosen_messages", "rejected_messages")),
    ("llamafactory", lambda t: _kind(t, "conversations") == "messages" and _kind(t, "chosen") == "message"),
    ("llamafactory-kto", lambda t: _kind(t, "messages") == "messages" and _kind(t, "label") in ("bool", "text")
     and "chosen" not in t.column_names),
    ("axolotl-chat_template", lambda t: _kind(t, "messages") in ("messages", "text")
     and _kind(t, "chosen") in ("message", "text", "messages") and "rejected" in t.column_names),
    ("axolotl-chatml.intel", lambda t: _has("question", "chosen", "rejected")(t) and _kind(t, "chosen") == "text"),
    ("axolotl-chatml.argilla", _has("instruction", "chosen_response", "rejected_response")),
    ("axolotl-chatml.ultra", lambda t: _kind(t, "prompt") == "text" and _kind(t, "chosen") == "messages"
     and _kind(t, "rejected") == "messages"),
    ("sharegpt", lambda t: _kind(t, "conversations") == "messages" and "chosen" in t.column_names),
    ("distilabel-ultrafeedback", _has("instruction", "generations", "ratings")),
    ("distilabel-prometheus", lambda t: _has("instruction", "result")(t)
     and ("generation" in t.column_names or "generations" in t.column_names)),
    ("ultrafeedback", _has("instruction", "completions")),
    ("oasst", lambda t: "message_id" in t.column_names or _has("message_tree_id", "prompt")(t)),
    ("arena", lambda t: _has("winner", "conversation_a", "conversation_b")(t) or "winner_model_a" in t.column_names),
    ("alpaca-eval", _has("output_1", "output_2", "preference")),
    ("graded-pairwise", _has("completion_a", "completion_b", "preference")),
    ("shp", _has("human_ref_A", "human_ref_B")),
    ("openai-comparisons", _has("info", "summaries", "choice")),
    ("nectar", _has("prompt", "answers")),
    ("helpsteer2", lambda t: _has("response_1", "response_2", "preference_strength")(t)
     or _has("prompt", "response", "helpfulness")(t)),
    ("pku-saferlhf", _has("response_0", "response_1")),
    ("argilla", lambda t: any(c.endswith(".responses") for c in t.column_names) or _has("fields", "responses")(t)),
    ("label-studio", lambda t: "data" in t.column_names and ("annotations" in t.column_names
                                                             or "completions" in t.column_names)),
    ("openai-dpo", _has("input", "preferred_output", "non_preferred_output")),
    ("llamafactory", lambda t: _has("instruction", "chosen", "rejected")(t) and _kind(t, "chosen") == "text"),
    ("hh-rlhf", _hh),
    ("trl-unpaired", _has("prompt", "completion", "label")),
    ("listwise", _has("prompt", "responses", "scores")),
    ("trl-preference", lambda t: _has("chosen", "rejected")(t) and _kind(t, "chosen") in ("text", "messages")),
]


def guess(table: pa.Table) -> str | None:
    """The format whose shape ``table`` (a raw batch) has, or None."""
    for name, test in SHAPES:
        try:
            if test(table):
                return name
        except (pa.ArrowException, TypeError, ValueError):  # a hint is never worth a failure
            continue
    return None


def hint(table: pa.Table | None, fmt: str, message: str = "") -> str:
    """``"; this file looks like X (--from X)"`` when its shape is another format's."""
    if table is None or "--from" in message:
        return ""
    found = guess(table)
    if found is None or found == fmt:
        return ""
    return f"; the file's columns look like {found}: try --from {found}"


def columns_seen(table: pa.Table | None) -> str:
    """Column names and value kinds, for an error that says what a file holds."""
    if table is None or not table.column_names:
        return "no columns"
    return ", ".join(f"{n} ({_kind(table, n) or _type_name(table, n)})" for n in table.column_names)


def _type_name(table: pa.Table, name: str) -> str:
    t = table.schema.field(name).type
    return "null" if pa.types.is_null(t) else str(t)
