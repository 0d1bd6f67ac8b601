"""Bounds on what a label file may hold, checked before a parser or a reader sees the data.

- ``MAX_JSON_DEPTH`` (64): nesting of JSON arrays and objects in one record. Real label files
  nest a few levels (an OASST message tree: about three per conversation turn); Python's json
  raises RecursionError near 1,000 levels and Arrow's JSON reader crashes the interpreter near
  20,000, so deeper records are refused before either parses them.
- ``MAX_FIELD_BYTES`` (16 MiB, ``--max-field-mb``): one text value. A record (a JSON line or
  array item) may be at most ``RECORD_FIELDS`` (4) times that before it is parsed, so a
  compressed file cannot make one row take gigabytes (a 100 MB field inflates about eightfold
  in Python objects).

Deep nesting is found without parsing: a JSON line can only be as deep as it has ``[`` and
``{`` bytes, which NumPy counts per line; only a line with more than ``MAX_JSON_DEPTH`` of them
is scanned exactly (brackets inside strings do not count).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels.errors import LabelsError

MAX_JSON_DEPTH = 64
MAX_FIELD_BYTES = 16 << 20
RECORD_FIELDS = 4  # a record may hold this many maximal fields before it is refused unparsed

_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))
_QUOTE, _BACKSLASH, _NEWLINE = ord('"'), ord("\\"), ord("\n")


def record_limit(max_field_bytes: int) -> int:
    return max_field_bytes * RECORD_FIELDS


def mib(n: int) -> str:
    return f"{n / (1 << 20):.3g} MiB"


def json_depth(data: bytes | str) -> int:
    """The deepest nesting of arrays and objects in one JSON text (strings and escapes honoured)."""
    b = np.frombuffer(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data, dtype=np.uint8)
    if len(b) == 0:
        return 0
    backslash = b == _BACKSLASH
    idx = np.arange(len(b), dtype=np.int64)
    last_other = np.where(backslash, -1, idx)
    np.maximum.accumulate(last_other, out=last_other)
    before = np.empty(len(b), dtype=np.int64)  # backslashes right before each byte
    before[0] = 0
    before[1:] = idx[1:] - 1 - last_other[:-1]
    quote = (b == _QUOTE) & (before % 2 == 0)
    inside = (np.cumsum(quote) - quote) % 2 == 1  # within a string (a quote opens or closes one)
    step = np.zeros(len(b), dtype=np.int32)
    step[np.isin(b, _OPEN) & ~inside] = 1
    step[np.isin(b, _CLOSE) & ~inside] = -1
    return int(max(0, np.cumsum(step).max()))


def check_record(text: bytes | str, path, row: int, max_field_bytes: int) -> None:
    """Refuse one JSON record (line or array item) that is too large or too deep to parse safely."""
    size = len(text)
    if size > record_limit(max_field_bytes):
        raise LabelsError(f"{path}: row {row}: a record of {mib(size)} is over the limit of {mib(record_limit(max_field_bytes))} "
                          f"({RECORD_FIELDS} x --max-field-mb {max_field_bytes / (1 << 20):g})")
    opens = text.count(b"[") + text.count(b"{") if isinstance(text, bytes) else text.count("[") + text.count("{")
    if opens > MAX_JSON_DEPTH:
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise LabelsError(f"{path}: row {row}: JSON nested {depth} levels deep (the limit is {MAX_JSON_DEPTH})")


class LineBlocks:
    """Blocks of whole JSON lines from a byte stream, none holding a line longer than the record
    limit or nested deeper than ``MAX_JSON_DEPTH`` (LabelsError naming the row instead).

    Iterates ``(block, first row, first line)``: about ``block_bytes`` each, cut after a newline
    (rows: non-blank lines; lines counted from 1). Each block
    is checked with a few NumPy passes (bytes and ``[``/``{`` per line); only a line with more
    than ``MAX_JSON_DEPTH`` of those is scanned exactly. A line longer than a block is gathered
    (in chunks) until it ends, or refused once it passes the limit.
    """

    def __init__(self, stream, path, max_field_bytes: int, block_bytes: int):
        self.stream, self.path, self.block_bytes = stream, path, block_bytes
        self.max_field_bytes = max_field_bytes
        self.limit = record_limit(max_field_bytes)

    def __iter__(self):
        pending: list[bytes] = []  # the unfinished last line so far
        pending_len = 0
        row, line = 0, 1
        while True:
            data = self.stream.read(self.block_bytes)
            if not data:
                break
            cut = data.rfind(b"\n")
            if cut < 0:  # a line longer than a block: gather it
                pending.append(data)
                pending_len += len(data)
                if pending_len > self.limit:
                    raise self._too_long(row)
                continue
            view = memoryview(data)  # slices of a view copy nothing
            block = b"".join([*pending, view[: cut + 1]]) if pending else view[: cut + 1]
            rest = bytes(view[cut + 1:])
            pending, pending_len = [rest] if rest else [], len(rest)
            rows, lines = self._check(block, row)
            yield block, row, line
            row, line = row + rows, line + lines
        if pending_len:
            block = memoryview(b"".join(pending))
            self._check(block, row)
            yield block, row, line

    def _too_long(self, row: int) -> LabelsError:
        return LabelsError(f"{self.path}: row {row}: a record of over {mib(self.limit)} (the limit is "
                           f"{RECORD_FIELDS} x --max-field-mb {self.max_field_bytes / (1 << 20):g})")

    def _check(self, block: memoryview, first_row: int) -> tuple[int, int]:
        """Refuse a line of ``block`` over the limits; returns the block's rows (non-blank lines) and lines."""
        b = np.frombuffer(block, dtype=np.uint8)
        mark = b == _NEWLINE  # NumPy releases the GIL: this runs beside the conversion (a prefetch thread)
        mark |= b == _OPEN[0]
        mark |= b == _OPEN[1]
        at = np.flatnonzero(mark)  # sparse in text: one pass finds newlines and opens
        newline = b[at] == _NEWLINE
        ends, opens = at[newline], at[~newline]
        if len(ends) == 0 or ends[-1] != len(b) - 1:
            ends = np.append(ends, len(b))
        starts = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - starts
        counts = np.searchsorted(opens, ends) - np.searchsorted(opens, starts)
        blank = lengths <= 1  # empty, or a lone carriage return
        if (lengths > 1).any() and (lengths[lengths > 1] < 64).any():  # short lines: look for whitespace-only ones
            for i in np.flatnonzero((lengths > 1) & (lengths < 64)):
                blank[i] = not bytes(block[starts[i]:ends[i]]).strip()
        for i in np.flatnonzero((lengths > self.limit) | (counts > MAX_JSON_DEPTH)):
            row = first_row + int((~blank[:i]).sum())
            if lengths[i] > self.limit:
                raise self._too_long(row)
            check_record(bytes(block[starts[i]:ends[i]]), self.path, row, self.max_field_bytes)
        return int((~blank).sum()), len(ends)


def oversized_rows(table: pa.Table, max_field_bytes: int) -> tuple[np.ndarray, list[str]]:
    """Rows holding a text value over ``max_field_bytes`` (at any depth) and the field named for each."""
    bad = np.zeros(table.num_rows, dtype=bool)
    fields = np.full(table.num_rows, "", dtype=object)
    for name in table.column_names:
        column = table.column(name)
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        starts = np.cumsum([0] + [len(c) for c in chunks])
        found = [_oversized(c, max_field_bytes) + start for c, start in zip(chunks, starts)]
        rows = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        if rows.size:
            new = rows[~bad[rows]]
            fields[new] = name
            bad[rows] = True
    return bad, fields


def is_text_type(t: pa.DataType) -> bool:
    """A string or binary type, large or not."""
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _oversized(array: pa.Array, limit: int) -> np.ndarray:
    """Top-level positions of ``array`` holding a string or binary value longer than ``limit``."""
    t = array.type
    if is_text_type(t):
        if len(array) == 0 or array.buffers()[2] is None or array.buffers()[2].size <= limit:  # all of it is smaller
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(pc.fill_null(pc.greater(pc.binary_length(array), limit), False).to_numpy(zero_copy_only=False))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _oversized(pc.list_flatten(array), limit)
        if inner.size == 0:
            return inner
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.unique(parents[inner])
    if pa.types.is_struct(t):
        found = [_oversized(pc.struct_field(array, i), limit) for i in range(t.num_fields)]
        found = [f for f in found if f.size]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
    return np.zeros(0, dtype=np.int64)
