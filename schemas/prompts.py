"""Prompt normalisation: plain strings become one user turn; ``prompt_id`` is a stable hash.

All functions work on whole Arrow columns, with no Python loop per row.
"""

from __future__ import annotations

import binascii
import sys
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.schemas.kinds import MESSAGES
from alignflow.schemas.pandas_free import import_pandas
from alignflow.schemas.siphash import block_counts, pandas_hash_mix, siphash24

_ROLE_SEP = "\x1f"  # between role and content of one message
_MSG_SEP = "\x1e"  # between messages


def messages(text_or_messages: str | Iterable[dict]) -> list[dict]:
    """One prompt as a message list (a plain string becomes one user turn)."""
    if isinstance(text_or_messages, str):
        return [{"role": "user", "content": text_or_messages}]
    return [{"role": m["role"], "content": m["content"]} for m in text_or_messages]


def to_messages_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A prompt column (strings or message lists) as ``list<struct<role, content>>``.

    Strings become ``[{"role": "user", "content": s}]``; nulls stay null.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        content = column.cast(pa.string())
        n = len(content)
        roles = pa.array(np.full(n, "user", dtype=object), pa.string())
        structs = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
        offsets = pa.array(np.arange(n + 1, dtype=np.int32))
        out = pa.ListArray.from_arrays(offsets, structs, type=MESSAGES)
        if content.null_count:
            out = pc.if_else(pc.is_null(content), pa.scalar(None, MESSAGES), out)
        return out
    return column.cast(MESSAGES)


def canonical_prompt_text(prompts: pa.Array) -> pa.Array:
    """One string per prompt that identifies it exactly (roles and contents, in order)."""
    flat = pc.list_flatten(prompts)
    role = pc.struct_field(flat, "role")
    content = pc.struct_field(flat, "content")
    joined = pc.binary_join_element_wise(pc.fill_null(role, ""), pc.fill_null(content, ""), _ROLE_SEP)
    offsets = pc.list_value_length(prompts).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(offsets)]).astype(np.int32)
    per_prompt = pa.ListArray.from_arrays(pa.array(offsets), joined)
    return pc.binary_join(per_prompt, _MSG_SEP)


def prompt_ids(prompts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Stable 16-hex-digit ids of a ``list<struct<role, content>>`` column: ``text_hashes`` of
    the canonical text, so the same prompt gets the same id on every machine and every run."""
    if isinstance(prompts, pa.ChunkedArray):
        prompts = prompts.chunk(0) if prompts.num_chunks == 1 else prompts.combine_chunks()
    return _hex16(text_hashes(canonical_prompt_text(prompts)))


# The numpy hash makes one pass per 8-byte block of the longest text (about 40 us each) and
# spends about 60 ns per block of text. Once this process has spent (by that estimate) the cost
# of importing pandas, about 0.1-0.2 s, pandas' C loop takes over: at most twice the better
# choice, whether a job hashes a few thousand prompts or millions in batches.
NUMPY_HASH_BUDGET_S = 0.1
_numpy_hash_spent_s = 0.0


def text_hashes(text: pa.Array, via_pandas: bool | None = None) -> np.ndarray:
    """pandas' ``hash_array`` of each string (SipHash-2-4 under pandas' fixed key, then its
    mixing step) as uint64. Computed in numpy (``schemas/siphash.py``) while that is cheap,
    sparing the pandas import; by pandas' C loop where pandas is loaded anyway or the numpy
    work would exceed the budget. ``via_pandas`` forces one way (tests compare the two)."""
    global _numpy_hash_spent_s
    if via_pandas is None:
        longest_blocks, all_blocks = block_counts(text)
        estimate = 40e-6 * longest_blocks + 60e-9 * all_blocks
        via_pandas = "pandas" in sys.modules or _numpy_hash_spent_s + estimate > NUMPY_HASH_BUDGET_S
        if not via_pandas:
            _numpy_hash_spent_s += estimate
    if via_pandas:
        pd = import_pandas()
        return pd.util.hash_array(text.to_numpy(zero_copy_only=False).astype(object), categorize=False).astype(np.uint64)
    return pandas_hash_mix(siphash24(text))


def _hex16(values: np.ndarray) -> pa.Array:
    """uint64 values as 16-character lowercase hex strings, without a per-row loop."""
    digits = binascii.hexlify(values.astype(">u8").tobytes())  # 16 hex digits per value, back to back
    offsets = np.arange(0, 16 * (len(values) + 1), 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets.tobytes()), pa.py_buffer(digits))


def prompt_id(prompt: str | Iterable[dict]) -> str:
    """The ``prompt_id`` of one prompt (same value as the column function)."""
    arr = pa.array([messages(prompt)], MESSAGES)
    return prompt_ids(arr)[0].as_py()


def fill_prompt_ids(given: pa.Array | pa.ChunkedArray | None, prompts: pa.Array) -> pa.Array | pa.ChunkedArray:
    """The ``prompt_id`` column: the ``given`` ids (as strings), with the stable hash of the
    prompt where an id is missing or none is given. Nothing is hashed when every id is given."""
    given = None if given is None else given.cast(pa.string())
    if given is not None and not given.null_count:
        return given
    ids = prompt_ids(prompts.fill_null(pa.scalar([], MESSAGES)) if prompts.null_count else prompts)
    return ids if given is None else pc.coalesce(given, ids)


def normalize_prompt_columns(table: pa.Table) -> pa.Table:
    """Promote a string ``prompt`` column to messages and fill missing ``prompt_id`` values."""
    if "prompt" not in table.column_names:
        return table
    prompts = to_messages_array(table.column("prompt"))
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", prompts)
    if "prompt_id" in table.column_names:
        ids = fill_prompt_ids(table.column("prompt_id"), prompts)
        return table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)
    return table.add_column(0, "prompt_id", fill_prompt_ids(None, prompts))
    prompts = to_messages_array(table.column("prompt"))
    table = table.set_column(table.schema.get_field_index("prompt"), "prompt", prompts)
    if "prompt_id" in table.column_names and table.column("prompt_id").null_count == 0:
        given = table.column("prompt_id").cast(pa.string())  # every id given: nothing to hash
        return table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", given)
    ids = prompt_ids(prompts.fill_null(pa.scalar([], MESSAGES)) if prompts.null_count else prompts)
    if "prompt_id" in table.column_names:
        given = table.column("prompt_id").cast(pa.string())
        ids = pc.coalesce(given, ids)
        table = table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)
    else:
        table = table.add_column(0, "prompt_id", ids)
    return table
