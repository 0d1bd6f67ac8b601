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

import io

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


class GuardedJsonLines(io.RawIOBase):
    """A byte stream of JSON lines that refuses, before handing them on, lines nested deeper than
    ``MAX_JSON_DEPTH`` or longer than the record limit (so Arrow's reader never parses them).

    Each chunk is checked with a few NumPy passes: bytes per line and ``[``/``{`` per line; only
    a suspicious line is scanned exactly. A line cut by the chunk end is kept (up to the record
    limit) and checked when it is complete.
    """

    def __init__(self, raw, path, max_field_bytes: int):
        super().__init__()
        self.raw, self.path = raw, path
        self.limit = record_limit(max_field_bytes)
        self.max_field_bytes = max_field_bytes
        self.tail = b""  # the unfinished last line so far (its bytes, while under the limit)
        self.tail_len = 0
        self.tail_opens = 0
        self.rows = 0  # non-empty lines before the current one

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        if not data:
            if self.tail_len:
                self._check_line(self.tail, self.tail_len, self.tail_opens, self.rows)
                self.tail, self.tail_len, self.tail_opens = b"", 0, 0
            return 0
        data = bytes(data)
        self._check(data)
        buffer[: len(data)] = data
        return len(data)

    def _check(self, data: bytes) -> None:
        b = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(b == _NEWLINE)
        cum = np.concatenate([[0], np.cumsum(np.isin(b, _OPEN), dtype=np.int64)])
        if len(ends) == 0:
            self._grow_tail(data, int(cum[-1]))
            return
        starts = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - starts
        counts = cum[ends] - cum[starts]
        lengths[0] += self.tail_len  # the line cut by the previous chunk ends here
        counts[0] += self.tail_opens
        nonblank = lengths > 0
        for i in np.flatnonzero((lengths > self.limit) | (counts > MAX_JSON_DEPTH)):
            line = (self.tail if i == 0 else b"") + data[starts[i]:ends[i]]
            self._check_line(line, int(lengths[i]), int(counts[i]), self.rows + int(nonblank[:i].sum()))
        self.rows += int(nonblank.sum())
        self.tail, self.tail_len, self.tail_opens = b"", 0, 0
        self._grow_tail(data[ends[-1] + 1:], int(cum[-1] - cum[ends[-1] + 1]))

    def _grow_tail(self, data: bytes, opens: int) -> None:
        self.tail_len += len(data)
        self.tail_opens += opens
        self._check_line(b"", self.tail_len, 0, self.rows)  # too long already: no need to wait for its end
        self.tail += data

    def _check_line(self, line: bytes, length: int, opens: int, row: int) -> None:
        if length > self.limit:
            raise LabelsError(f"{self.path}: row {row}: a record of over {mib(self.limit)} (the limit is "
                              f"{RECORD_FIELDS} x --max-field-mb {self.max_field_bytes / (1 << 20):g})")
        if opens > MAX_JSON_DEPTH:
            check_record(line, self.path, row, self.max_field_bytes)


def oversized_rows(table: pa.Table, max_field_bytes: int) -> tuple[np.ndarray, list[str]]:
    """Rows holding a text value over ``max_field_bytes`` (at any depth) and the field named for each."""
    bad = np.zeros(table.num_rows, dtype=bool)
    fields = np.full(table.num_rows, "", dtype=object)
    for name in table.column_names:
        column = table.column(name)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        rows = _oversized(column, max_field_bytes)
        if rows.size:
            new = rows[~bad[rows]]
            fields[new] = name
            bad[rows] = True
    return bad, fields


def _oversized(array: pa.Array, limit: int) -> np.ndarray:
    """Top-level positions of ``array`` holding a string or binary value longer than ``limit``."""
    t = array.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        if len(array) == 0 or (pc.max(pc.binary_length(array)).as_py() or 0) <= limit:
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
