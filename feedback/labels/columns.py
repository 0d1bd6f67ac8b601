"""Small column helpers shared by the format readers and exporters (all vectorized)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels.errors import FieldTypeError, missing_columns
from alignflow.feedback.labels.io import nontext_rows
from alignflow.schemas.kinds import MESSAGE, MESSAGES
from alignflow.schemas.prompts import canonical_prompt_text, to_messages_array
from alignflow.schemas.validate import quarantine_table, take_rows


def col(table: pa.Table, name: str) -> pa.Array:
    return one_array(table.column(name))


def one_array(c: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one array; a single chunk is returned as is (``combine_chunks`` would copy it)."""
    if isinstance(c, pa.ChunkedArray):
        return c.chunk(0) if c.num_chunks == 1 else c.combine_chunks()
    return c


def text(table: pa.Table, name: str) -> pa.Array:
    """A column as strings: numbers, booleans and dates become their text; an object or a list
    (a message dict, a conversation) is refused (FieldTypeError naming the row), never turned
    into JSON text, and so is a byte string that is not UTF-8."""
    c = col(table, name)
    if pa.types.is_string(c.type):
        marked = nontext_rows(table).get(name)
        if marked:
            raise FieldTypeError(name, marked[0], "expected text, got an object or a list")
        return c
    if pa.types.is_nested(c.type):
        valid = np.flatnonzero(c.is_valid().to_numpy(zero_copy_only=False))
        if len(valid) == 0:
            return pa.nulls(len(c), pa.string())
        raise FieldTypeError(name, int(valid[0]), f"expected text, got {describe_value(c[int(valid[0])].as_py())}")
    if pa.types.is_binary(c.type) or pa.types.is_large_binary(c.type):
        try:
            return c.cast(pa.string())
        except pa.ArrowInvalid:
            bad = next(i for i, v in enumerate(c.to_pylist()) if v is not None and not _is_utf8(v))
            raise FieldTypeError(name, bad, "not UTF-8 text") from None
    try:
        return c.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        valid = np.flatnonzero(c.is_valid().to_numpy(zero_copy_only=False))
        raise FieldTypeError(name, int(valid[0]) if len(valid) else 0, f"expected text, got {c.type}") from None


def text_list(table: pa.Table, name: str) -> tuple[pa.Array, np.ndarray]:
    """A column of lists of texts -> (the texts, flattened; items per row). An item that is
    not text is refused like ``text`` does, naming the row that holds it."""
    c = col(table, name)
    if pa.types.is_null(c.type):
        return pa.array([], pa.string()), np.zeros(len(c), dtype=np.int64)
    if not (pa.types.is_list(c.type) or pa.types.is_large_list(c.type)):
        valid = np.flatnonzero(c.is_valid().to_numpy(zero_copy_only=False))
        raise FieldTypeError(name, int(valid[0]) if len(valid) else 0, f"expected a list of texts, got {c.type}")
    lengths = pc.list_value_length(c).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    try:
        flat = text(pa.table({name: pc.list_flatten(c)}), name)
    except FieldTypeError as exc:
        parents = pc.list_parent_indices(c).to_numpy(zero_copy_only=False)
        raise FieldTypeError(name, int(parents[exc.row]), exc.what + " (in the list)") from None
    return flat, lengths


def item_field(lists: pa.Array, key: str, name: str) -> pa.Array:
    """Field ``key`` of every item of a column of object lists, flattened (all null where the
    items lack it; ``expect(..., "objects")`` has checked the items are objects)."""
    flat = pc.list_flatten(lists)
    if key not in [f.name for f in flat.type]:
        return pa.nulls(len(flat))
    return pc.struct_field(flat, key)


def item_text(lists: pa.Array, key: str, name: str) -> pa.Array:
    """``item_field`` as text; an item whose value is an object or a list is refused, naming its row."""
    values = item_field(lists, key, name)
    try:
        return text(pa.table({f"{name}.{key}": values}), f"{name}.{key}")
    except FieldTypeError as exc:
        parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
        raise FieldTypeError(exc.field, int(parents[exc.row]), exc.what) from None


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def describe_value(value) -> str:
    """A short description of a value of the wrong type, for an error message."""
    if isinstance(value, dict):
        keys = [k for k, v in value.items() if v is not None] or list(value)
        shown = ", ".join(map(str, keys[:4])) + (", ..." if len(keys) > 4 else "")
        return f"an object {{{shown}}}" + (" (a message)" if {"from", "value"} <= set(keys) or
                                              {"role", "content"} <= set(keys) else "")
    if isinstance(value, list):
        return f"a list of {len(value)}" + (f" ({describe_value(value[0])} ...)" if value else "")
    return {str: "text", bool: "a boolean", int: "a number", float: "a number", type(None): "null"}.get(
        type(value), type(value).__name__)


def require(table: pa.Table, names: list[str], ctx) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise missing_columns(ctx.path, ctx.fmt, missing, table.column_names)


VALUE_SHAPES = {  # what a reader may expect of a column's values -> Arrow type tests
    "text": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
    or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_binary(t) or pa.types.is_temporal(t),
    "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    or pa.types.is_string(t) or pa.types.is_large_string(t),
    "list": lambda t: pa.types.is_list(t) or pa.types.is_large_list(t),
    "object": pa.types.is_struct,
    "messages": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)
    and {"role", "content"} <= {f.name for f in t.value_type},
    "objects": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type),
}
SHAPE_NAMES = {"text": "text", "number": "a number", "list": "a list", "object": "an object",
               "messages": "a list of {role, content} messages", "objects": "a list of objects"}


def expect(table: pa.Table, shapes: dict[str, str]) -> None:
    """Refuse columns whose values are not of the shape a reader expects (``"text"``,
    ``"number"``, ``"list"``, ``"object"``, ``"messages"``, ``"objects"``; alternatives joined by
    ``|``): FieldTypeError naming the first row whose value differs. An absent column passes
    (``require`` says what is missing); so does a column of nulls only, unless its shape is a
    list or an object that the reader needs (no ``?`` after the shape): there is nothing to read."""
    for name, shape in shapes.items():
        if name not in table.column_names:
            continue
        optional = shape.endswith("?")
        shape = shape.rstrip("?")
        t = table.schema.field(name).type
        nested = [k for k in shape.split("|") if k in ("list", "object", "messages", "objects")]
        if pa.types.is_null(t) and nested and len(nested) == len(shape.split("|")) and not optional:
            raise FieldTypeError(name, 0, f"expected {SHAPE_NAMES[nested[0]]}, every row holds null")
        marked = nontext_rows(table).get(name)
        if marked:  # text in some rows, objects or lists (kept as JSON) in others: no reader takes both
            raise FieldTypeError(name, marked[0], "a column that holds text in some rows and an object or a list in "
                                                  "others (this one)")
        if pa.types.is_null(t) or any(VALUE_SHAPES[k](t) for k in shape.split("|")):
            continue
        c = col(table, name)
        valid = np.flatnonzero(c.is_valid().to_numpy(zero_copy_only=False))
        row = int(valid[0]) if len(valid) else 0
        got = describe_value(c[row].as_py()) if len(valid) else str(t)
        want = " or ".join(SHAPE_NAMES[k] for k in shape.split("|"))
        raise FieldTypeError(name, row, f"expected {want}, got {got}")


def first_present(table: pa.Table, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in table.column_names), None)


def as_prompt(column: pa.Array) -> pa.Array:
    """Plain text or message lists -> ``list<struct<role, content>>``."""
    return to_messages_array(column)


def one_message(content: pa.Array, role: str = "assistant") -> pa.Array:
    """Each string as a one-message list ``[{role, content}]``."""
    n = len(content)
    roles = pa.array(np.full(n, role, dtype=object), pa.string()) if n else pa.array([], pa.string())
    structs = pa.StructArray.from_arrays([roles, content.cast(pa.string())], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), structs, type=MESSAGES)


def canonical_messages(messages: pa.Array, name: str = "messages") -> pa.Array:
    """Message lists whose items have ``role`` and ``content`` (and maybe more fields) as
    ``list<struct<role, content>>``; a role or content that is not text (an object, a list) is
    refused (FieldTypeError naming the row)."""
    if messages.type == MESSAGES:
        return messages
    if pa.types.is_null(messages.type):
        return pa.nulls(len(messages), MESSAGES)
    flat = pc.list_flatten(messages)
    if not pa.types.is_struct(flat.type) or not {"role", "content"} <= {f.name for f in flat.type}:
        raise FieldTypeError(name, 0, f"expected a list of {{role, content}} messages, got {messages.type}")
    parents = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    fields = []
    for key in ("role", "content"):
        try:
            fields.append(text(pa.table({key: pc.struct_field(flat, key)}), key))
        except FieldTypeError as exc:
            raise FieldTypeError(f"{name}.{key}", int(parents[exc.row]), exc.what) from None
    lengths = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    out = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays(fields, fields=list(MESSAGE)), type=MESSAGES)
    return pc.if_else(messages.is_null(), pa.scalar(None, MESSAGES), out) if messages.null_count else out


def last_and_rest(messages: pa.Array, name: str = "messages") -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray]:
    """Split message lists into (all but the last message, last content, last role, non-empty)."""
    messages = canonical_messages(messages, name)
    lengths = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(messages)
    ends = np.cumsum(lengths)
    nonempty = lengths > 0
    last_idx = np.where(nonempty, ends - 1, 0)
    if len(flat) == 0:
        empty = pa.nulls(len(lengths), pa.string())
        return pa.array([[] for _ in lengths], MESSAGES), empty, empty, nonempty
    last = flat.take(pa.array(last_idx))
    content = pc.if_else(pa.array(nonempty), pc.struct_field(last, "content"), pa.scalar(None, pa.string()))
    role = pc.if_else(pa.array(nonempty), pc.struct_field(last, "role"), pa.scalar(None, pa.string()))
    keep = np.ones(len(flat), dtype=bool)
    keep[last_idx[nonempty]] = False
    rest_len = np.maximum(lengths - 1, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(rest_len)]).astype(np.int32))
    rest = pa.ListArray.from_arrays(offsets, flat.filter(pa.array(keep)), type=MESSAGES)
    return rest, content, role, nonempty


def same_messages(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Row-wise equality of two message-list columns."""
    return pc.fill_null(pc.equal(canonical_prompt_text(a), canonical_prompt_text(b)), False).to_numpy(zero_copy_only=False)


def nonzero_mask(mask) -> np.ndarray:
    if isinstance(mask, (pa.Array, pa.ChunkedArray)):
        mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
    return np.asarray(mask, dtype=bool)


class Quarantine:
    """Collects rows of the raw input that a reader refuses, with one reason each."""

    def __init__(self, raw: pa.Table, row_offset: int):
        self.raw = raw
        self.row_offset = row_offset
        self.bad = np.zeros(raw.num_rows, dtype=bool)
        self.reasons = np.full(raw.num_rows, "", dtype=object)

    def add(self, mask, reason: str) -> None:
        mask = nonzero_mask(mask) & ~self.bad  # first reason wins
        self.reasons[mask] = reason
        self.bad |= mask

    def table(self) -> pa.Table:
        idx = np.flatnonzero(self.bad)
        return quarantine_table(take_rows(self.raw, idx), idx + self.row_offset, list(self.reasons[idx]))

    def counts(self) -> dict[str, int]:
        values, counts = np.unique(self.reasons[self.bad].astype(str), return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


def interleave_turns(users: pa.Array, assistants: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Lists of user turns [n] and assistant turns [n] -> one conversation [2n] per row.

    Rows whose two lists differ in length come back empty and flagged False.
    """
    lu = pc.list_value_length(users).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    la = pc.list_value_length(assistants).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ok = (lu == la) & (lu > 0)
    n = np.where(ok, lu, 0)
    fu, fa = pc.list_flatten(users), pc.list_flatten(assistants)
    u_start = np.concatenate([[0], np.cumsum(lu)[:-1]]).astype(np.int64)
    a_start = np.concatenate([[0], np.cumsum(la)[:-1]]).astype(np.int64)
    row = np.repeat(np.arange(len(n)), n)
    turn = np.arange(int(n.sum())) - np.repeat(np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    u_idx = u_start[row] + turn
    a_idx = a_start[row] + turn
    content = pa.concat_arrays([fu.take(pa.array(u_idx)).cast(pa.string()), fa.take(pa.array(a_idx)).cast(pa.string())])
    # interleave: position 2t user, 2t+1 assistant
    order = np.empty(2 * len(u_idx), dtype=np.int64)
    order[0::2] = np.arange(len(u_idx))
    order[1::2] = np.arange(len(u_idx)) + len(u_idx)
    content = content.take(pa.array(order))
    roles = np.empty(len(order), dtype=object)
    roles[0::2], roles[1::2] = "user", "assistant"
    structs = pa.StructArray.from_arrays([pa.array(roles, pa.string()), content], fields=list(MESSAGE))
    offsets = pa.array(np.concatenate([[0], np.cumsum(2 * n)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, structs, type=MESSAGES), ok
