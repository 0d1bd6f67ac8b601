"""Small column helpers shared by the format readers and exporters (all vectorized)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels.errors import missing_columns
from alignflow.schemas.kinds import MESSAGE, MESSAGES
from alignflow.schemas.prompts import canonical_prompt_text, to_messages_array
from alignflow.schemas.validate import quarantine_table


def col(table: pa.Table, name: str) -> pa.Array:
    return one_array(table.column(name))


def one_array(c: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as one array; a single chunk is returned as is (``combine_chunks`` would copy it)."""
    if isinstance(c, pa.ChunkedArray):
        return c.chunk(0) if c.num_chunks == 1 else c.combine_chunks()
    return c


def text(table: pa.Table, name: str) -> pa.Array:
    """A column as strings (numbers become their text; nested values become JSON)."""
    c = col(table, name)
    if pa.types.is_string(c.type):
        return c
    if pa.types.is_large_string(c.type) or pa.types.is_integer(c.type) or pa.types.is_floating(c.type) or pa.types.is_null(c.type):
        return c.cast(pa.string())
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in c.to_pylist()], pa.string())


def require(table: pa.Table, names: list[str], ctx) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise missing_columns(ctx.path, ctx.fmt, missing, table.column_names)


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


def last_and_rest(messages: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray]:
    """Split message lists into (all but the last message, last content, last role, non-empty)."""
    messages = messages.cast(MESSAGES) if messages.type != MESSAGES else messages
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
        return quarantine_table(self.raw.take(pa.array(idx)), idx + self.row_offset, list(self.reasons[idx]))

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
