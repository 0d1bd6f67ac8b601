"""File IO for label files: read any supported encoding as Arrow record batches, write exports.

Encodings are taken from the file name: ``.jsonl``, ``.jsonl.gz`` (and ``.json.gz``), ``.json``
(an array of objects, or an object holding one), ``.parquet``, ``.csv`` and ``.xlsx``.
Every encoding streams in batches of ``batch_rows`` rows (memory independent of the file size):
Parquet, CSV and JSONL through Arrow's readers, a ``.json`` array one value at a time over a
sliding text window, an ``.xlsx`` sheet through openpyxl's read-only row iterator.
JSON records nested too deep or too large (``limits``) are refused before any parser sees them;
text that is not UTF-8 is an error naming the row.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from alignflow.feedback.labels.errors import LabelsError
from alignflow.feedback.labels.limits import (
    MAX_FIELD_BYTES,
    MAX_JSON_DEPTH,
    RECORD_FIELDS,
    LineBlocks,
    json_depth,
    mib,
    record_limit,
)

BATCH_ROWS = 65_536
BLOCK_BYTES = 1 << 24  # Arrow's JSON / CSV readers parse (and infer types) block by block
JSON_CHUNK_CHARS = 1 << 20  # text the .json array reader reads at a time
PARSE_CHUNK_BYTES = 1 << 20  # Arrow's JSON reader parses a block of lines in chunks of this size, in parallel
READ_ENCODINGS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".xlsx")
WRITE_ENCODINGS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


def encoding_of(path: str | os.PathLike) -> str:
    """The encoding named by ``path``'s extension (``.jsonl.gz`` counts as one), or raise."""
    name = Path(path).name.lower()
    for ext in sorted(READ_ENCODINGS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    if name.endswith(".gz"):
        return ".jsonl.gz"
    raise LabelsError(f"{path}: unknown file type (expected one of {', '.join(READ_ENCODINGS)})")


def iter_file_batches(path: str | os.PathLike, batch_rows: int = BATCH_ROWS,
                      max_field_bytes: int = MAX_FIELD_BYTES) -> Iterator[pa.Table]:
    """Stream ``path`` as Arrow tables of about ``batch_rows`` rows (row order kept).

    JSON records over ``limits.record_limit(max_field_bytes)`` or nested deeper than
    ``limits.MAX_JSON_DEPTH`` are refused unparsed (LabelsError naming the row)."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: no such file")
    ext = encoding_of(path)
    try:
        if ext == ".parquet":
            yield from _parquet_batches(path, batch_rows)
        elif ext == ".csv":
            yield from _csv_batches(path, batch_rows)
        elif ext in (".jsonl", ".jsonl.gz", ".json.gz"):
            yield from _jsonl_batches(path, batch_rows, max_field_bytes)
        elif ext == ".json":
            yield from _json_array_batches(path, batch_rows, max_field_bytes)
        elif ext == ".xlsx":
            yield from _xlsx_batches(path, batch_rows)
    except LabelsError:
        raise
    except RecursionError:
        raise LabelsError(f"{path}: unreadable as {ext[1:]} (nested too deeply)") from None
    except (pa.ArrowException, OSError, UnicodeDecodeError, EOFError, ValueError) as exc:
        raise LabelsError(f"{path}: unreadable as {ext[1:]} ({_first_line(exc)})") from None


def read_file(path: str | os.PathLike) -> pa.Table:
    """The whole file as one table (for formats that group rows across the file)."""
    tables = list(iter_file_batches(path))
    if not tables:
        return pa.table({})
    return concat_loose(tables)


NONTEXT_KEY = b"alignflow.nontext"  # schema metadata: {column: [rows]} whose value was an object/list kept as JSON text


def nontext_rows(table: pa.Table) -> dict[str, list[int]]:
    """Rows (per column) whose value was an object or a list in the file but is JSON text here
    (a column mixing types); a reader expecting text there must refuse it, not read the JSON."""
    meta = table.schema.metadata or {}
    return json.loads(meta[NONTEXT_KEY]) if NONTEXT_KEY in meta else {}


def _with_nontext(table: pa.Table, rows: dict[str, list[int]]) -> pa.Table:
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}), NONTEXT_KEY: json.dumps(rows)})


def concat_loose(tables: list[pa.Table]) -> pa.Table:
    """Concatenate batches whose types may differ (streamed readers infer per block): columns
    that cannot be promoted to one type become text (nested values as JSON, noted in
    ``nontext_rows``)."""
    if len(tables) == 1:
        return tables[0]
    marks: dict[str, list[int]] = {}
    offset = 0
    for t in tables:
        for name, rows in nontext_rows(t).items():
            marks.setdefault(name, []).extend(r + offset for r in rows)
        offset += t.num_rows
    tables = [t.replace_schema_metadata(None) for t in tables]
    try:
        return _with_nontext(pa.concat_tables(tables, promote_options="permissive"), marks)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    mixed = {name for name, ts in types.items() if len({t for t in ts if not pa.types.is_null(t)}) > 1}
    fixed = []
    offset = 0
    for t in tables:
        for name in mixed & set(t.column_names):
            col = t.column(name)
            nested = pa.types.is_nested(col.type)
            if nested:
                marks.setdefault(name, []).extend((np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False))
                                                   + offset).tolist())
            as_text = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) if nested else str(v)
                                for v in col.to_pylist()], pa.string()) if nested or not pa.types.is_string(col.type) \
                else col
            t = t.set_column(t.schema.get_field_index(name), name, as_text)
        fixed.append(t)
        offset += t.num_rows
    return _with_nontext(pa.concat_tables(fixed, promote_options="permissive"), marks)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _slices(table: pa.Table, batch_rows: int) -> Iterator[pa.Table]:
    if table.num_rows == 0:
        yield table
    for start in range(0, table.num_rows, batch_rows):
        yield table.slice(start, batch_rows)


def _parquet_batches(path: Path, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    # pre_buffer=False: with Arrow's default the buffered column chunks of every row group read
    # so far stay cached, so memory would grow with the file (measured: +60 bytes per row)
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows):
        yield pa.Table.from_batches([batch])


def _csv_batches(path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """CSV in blocks; Arrow infers column types from the first block, so when a later block
    disagrees (a number column that turns into text) the rest is read with every column as text."""
    import pyarrow.csv as pcsv

    done = 0
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES))
        for batch in reader:
            for table in _slices(pa.Table.from_batches([batch]), batch_rows):
                yield _utf8_checked(table, path, done)
                done += table.num_rows
        return
    except pa.ArrowInvalid:
        if done == 0:
            raise
    with pcsv.open_csv(path) as first:
        header = first.schema.names
    text_types = {name: pa.string() for name in header}
    reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES),
                           convert_options=pcsv.ConvertOptions(column_types=text_types))
    skipped, emitted = 0, done
    for batch in reader:
        table = pa.Table.from_batches([batch])
        if skipped < done:  # rows already yielded with the first block's types
            drop = min(done - skipped, table.num_rows)
            skipped += drop
            table = table.slice(drop)
        if table.num_rows:
            for part in _slices(table, batch_rows):
                yield _utf8_checked(part, path, emitted)
                emitted += part.num_rows


def _utf8_valid(table: pa.Table, path: Path, first_row: int) -> pa.Table:
    """Arrow's JSON reader keeps bytes that are not UTF-8 inside strings; later kernels fail on them.
    Validated once here (Arrow's full validation); the first bad row and field are named."""
    try:
        table.validate(full=True)
        return table
    except pa.ArrowInvalid:
        pass
    for name in table.column_names:
        column = table.column(name)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        for i in range(len(column)):
            try:
                column.slice(i, 1).validate(full=True)
            except pa.ArrowInvalid:
                raise LabelsError(f"{path}: row {first_row + i}: field {name!r}: not UTF-8 text") from None
    raise LabelsError(f"{path}: rows {first_row}-{first_row + table.num_rows - 1}: not valid data")


def _utf8_checked(table: pa.Table, path: Path, first_row: int) -> pa.Table:
    """Arrow reads CSV cells that are not UTF-8 as binary: name the first such row and field."""
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            for i, value in enumerate(column.to_pylist()):
                try:
                    value is None or value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LabelsError(f"{path}: row {first_row + i}: field {name!r}: not UTF-8 text (byte {exc.start + 1}: "
                                      f"{value[exc.start:exc.start + 1]!r})") from None
    return table


def _jsonl_batches(path: Path, batch_rows: int, max_field_bytes: int = MAX_FIELD_BYTES) -> Iterator[pa.Table]:
    """JSON lines, streamed in blocks of whole lines: each block is checked (``limits.LineBlocks``:
    no line too long or nested too deep reaches a parser), then parsed by Arrow's reader, or by
    Python's json where Arrow gives up on it (a column that changes type within the block).

    Each block gets its own Arrow types (a field null for thousands of rows and then a string,
    or a struct whose keys vary, is common in label files); the readers take any.
    """
    import pyarrow.json as pjson

    stream = pa.input_stream(str(path), compression="gzip" if path.name.lower().endswith(".gz") else None)
    with stream:
        for block, first_row, first_line in LineBlocks(stream, path, max_field_bytes, BLOCK_BYTES):
            table = None
            # chunks of 1 MiB are parsed on several threads; a line longer than a chunk needs the block as one
            for chunk in (PARSE_CHUNK_BYTES, len(block) + 1):
                try:
                    table = pjson.read_json(pa.BufferReader(block), read_options=pjson.ReadOptions(block_size=chunk))
                    break
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    continue
            if table is None:  # Arrow gives up on the block (a column changes type): Python's json
                table = _from_records(_parse_lines(block, path, first_row, first_line), path, first_row)
            else:
                table = _utf8_valid(table, path, first_row)
            yield from _slices(table, batch_rows)


def _parse_lines(block: bytes, path: Path, first_row: int, first_line: int) -> list:
    """Python's json over a block of lines (already within the limits), naming a bad row and line."""
    rows = []
    for number, line in enumerate(bytes(block).split(b"\n"), start=first_line):
        if not line.strip():
            continue
        row = first_row + len(rows)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LabelsError(f"{path}: row {row}: line {number} is not UTF-8 text (byte {exc.start + 1} of the "
                              f"line: {line[exc.start:exc.start + 1]!r})") from None
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise LabelsError(f"{path}: row {row}: line {number} is not JSON ({exc.msg})") from None
    return rows


class _JsonSyntaxError(ValueError):
    """Bad JSON at a line (the caller names file and row); ``syntax`` False: valid JSON over a limit."""

    def __init__(self, message: str, line: int, syntax: bool = True):
        super().__init__(message)
        self.message, self.line, self.syntax = message, line, syntax

    def describe(self) -> str:
        return f"line {self.line} is not JSON ({self.message})" if self.syntax else f"line {self.line}: {self.message}"


class _JsonWindow:
    """A sliding window over a JSON document, for decoding it one value at a time.

    The window holds the undecoded rest of the text read so far and grows only while a single
    value does not fit, so memory is bounded by ``chunk_chars`` plus the largest value (one
    row), not by the file. Line numbers (for errors only) are counted when asked for. Bytes are
    decoded here (an incremental UTF-8 decoder): at bytes that are not UTF-8 the text before
    them is still decoded, and the error is raised when the value being read needs more, so it
    names the row that holds them.
    """

    _NOT_SPACE = re.compile(r"[^ \t\n\r]")  # JSON's four whitespace characters only
    _ITEM_END = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")  # what follows an array item

    def __init__(self, path: Path, fh, chunk_chars: int, max_field_bytes: int = MAX_FIELD_BYTES):
        import codecs

        self.path, self.fh, self.chunk_chars = path, fh, chunk_chars  # fh: a binary file
        self.max_field_bytes = max_field_bytes
        self.buf, self.pos, self.eof = "", 0, False
        self.dropped = 0  # characters of the file before buf[0]
        self.decoder = json.JSONDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.started = False
        self.bad: bytes | None = None  # the first byte that is not UTF-8, once met

    def read_more(self, at_least: int = 0) -> bool:
        """Drop the consumed text and append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        if self.pos:
            self.dropped += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        if self.bad is not None:
            raise self.error(f"not UTF-8 text (byte {self.bad!r})", len(self.buf), syntax=False)
        raw = self.fh.read(max(self.chunk_chars, at_least))
        if not self.started:
            self.started = True
            if raw.startswith(b"\xef\xbb\xbf"):  # a byte order mark
                raw = raw[3:]
        try:
            data = self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            self.bad = exc.object[exc.start:exc.start + 1]
            data = exc.object[:exc.start].decode("utf-8")
        if not data:
            if self.bad is not None:
                raise self.error(f"not UTF-8 text (byte {self.bad!r})", len(self.buf), syntax=False)
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self, pos: int | None = None) -> int:
        """The line of ``buf[pos]``: counts the dropped text again (only ever on an error)."""
        before = 0
        with open(self.path, encoding="utf-8-sig", errors="replace") as fh:
            left = self.dropped
            while left > 0:
                part = fh.read(min(left, 1 << 20))
                if not part:
                    break
                before += part.count("\n")
                left -= len(part)
        return 1 + before + self.buf.count("\n", 0, self.pos if pos is None else pos)

    def error(self, message: str, pos: int | None = None, syntax: bool = True) -> _JsonSyntaxError:
        return _JsonSyntaxError(message, self.line(pos), syntax)

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file); the cursor moves to it."""
        while True:
            found = self._NOT_SPACE.search(self.buf, self.pos)
            if found:
                self.pos = found.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.read_more():
                return ""

    def expect(self, allowed: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            got = repr(char) if char else "the end of the file"
            raise self.error(f"expected {' or '.join(map(repr, allowed))}, got {got}")
        self.pos += 1
        return char

    def _decode(self):
        """raw_decode at the cursor; a failure reads on (doubling the window, so a long value is
        parsed O(log) times, not once per chunk) and is an error only at the end of the file."""
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self.error(f"JSON nested more levels deep than Python's parser takes (the limit is "
                                 f"{MAX_JSON_DEPTH})", syntax=False) from None
            except json.JSONDecodeError as exc:
                message, at = exc.msg, self.dropped + exc.pos  # in file characters: the window moves
                if self._NOT_SPACE.match(self.buf, self.pos) is None and self.peek():
                    continue  # the window ended in whitespace before the value: skipped now
                if len(self.buf) - self.pos > record_limit(self.max_field_bytes):
                    raise self.error(f"a record of over {mib(record_limit(self.max_field_bytes))} (the limit is "
                                     f"{RECORD_FIELDS} x --max-field-mb {self.max_field_bytes / (1 << 20):g})",
                                     syntax=False) from None
                if not self.read_more(len(self.buf)):
                    raise self.error(message, at - self.dropped) from None
                continue
            self._check_limits(self.pos, end)
            return obj, end

    def _check_limits(self, start: int, end: int) -> None:
        """A decoded value too large or too deep to hand on (Arrow, the readers) is refused."""
        if end - start > record_limit(self.max_field_bytes):
            raise self.error(f"a record of {mib(end - start)} is over the limit of {mib(record_limit(self.max_field_bytes))} "
                             f"({RECORD_FIELDS} x --max-field-mb {self.max_field_bytes / (1 << 20):g})", start, syntax=False)
        if self.buf.count("[", start, end) + self.buf.count("{", start, end) > MAX_JSON_DEPTH:
            depth = json_depth(self.buf[start:end])
            if depth > MAX_JSON_DEPTH:
                raise self.error(f"JSON nested {depth} levels deep (the limit is {MAX_JSON_DEPTH})", start, syntax=False)

    def value(self):
        """Decode the next value (an object key or value of a wrapper object)."""
        self.peek()  # raw_decode does not skip leading whitespace
        while True:
            obj, end = self._decode()
            if end == len(self.buf) and self.read_more():  # a number may continue in the next chunk
                continue
            self.pos = end
            return obj

    def item(self) -> tuple[object, bool]:
        """Decode the next array item and the ``,`` or ``]`` after it: (value, more items follow).

        The hot loop of the reader: one raw_decode and one regex match per row.
        """
        while True:
            obj, end = self._decode()
            sep = self._ITEM_END.match(self.buf, end)
            if sep:  # a separator follows, so the value was not cut off
                self.pos = sep.end()
                return obj, sep.group(1) == ","
            after = self._NOT_SPACE.search(self.buf, end)
            if after is not None:
                raise self.error(f"expected ',' or ']', got {after.group()!r}", after.start())
            if not self.read_more():  # the window ended inside or right after the value
                raise self.error("expected ',' or ']', got the end of the file", len(self.buf))


def _json_array_batches(path: Path, batch_rows: int, max_field_bytes: int = MAX_FIELD_BYTES) -> Iterator[pa.Table]:
    """A ``.json`` document, streamed: an array of objects, or an object holding one array
    (``{"data": [...]}``), decoded one row at a time (``json.JSONDecoder.raw_decode`` over a
    sliding window) and yielded every ``batch_rows`` rows."""
    with open(path, "rb") as fh:
        doc = _JsonWindow(path, fh, JSON_CHUNK_CHARS, max_field_bytes)
        first = doc.peek()
        if first == "[":
            doc.pos += 1
            yield from _json_array_items(doc, path, batch_rows)
        elif first == "{":
            doc.pos += 1
            yield from _json_wrapped_array(doc, path, batch_rows)
        else:
            raise LabelsError(f"{path}: row 0: expected a JSON array of objects (or an object holding one)")
        if doc.peek():
            raise LabelsError(f"{path}: line {doc.line()}: unreadable as json (extra data after the document)")


def _json_array_items(doc: _JsonWindow, path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """The items of an array whose ``[`` was consumed, as tables of ``batch_rows`` rows."""
    rows: list = []
    n = 0
    more = doc.peek() != "]"
    if not more:
        doc.pos += 1
    try:
        while more:
            row, more = doc.item()
            rows.append(row)
            n += 1
            if len(rows) >= batch_rows:
                yield _from_records(rows, path, n - len(rows))
                rows = []
    except _JsonSyntaxError as exc:
        raise LabelsError(f"{path}: row {n}: {exc.describe()}") from None
    if rows or n == 0:
        yield _from_records(rows, path, n - len(rows))


def _json_wrapped_array(doc: _JsonWindow, path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """An object whose ``{`` was consumed and one of whose values is the array of rows: that
    array is streamed; other values are decoded (and must not be arrays too)."""
    arrays = 0
    key = None
    try:
        if doc.peek() == "}":
            doc.pos += 1
        else:
            while True:
                key = doc.value()
                if not isinstance(key, str):
                    raise doc.error("an object key must be a string")
                doc.expect(":")
                if doc.peek() == "[" and not arrays:
                    doc.pos += 1
                    arrays += 1
                    yield from _json_array_items(doc, path, batch_rows)
                elif isinstance(doc.value(), list):
                    arrays += 1
                if doc.expect(",}") == "}":
                    break
    except _JsonSyntaxError as exc:
        field = f": field {key!r}" if isinstance(key, str) else ""
        raise LabelsError(f"{path}: row 0{field}: {exc.describe()}") from None
    if arrays != 1:
        raise LabelsError(f"{path}: row 0: expected a JSON array of objects (or an object holding one)")


def _from_records(rows: list, path: Path, first_row: int = 0) -> pa.Table:
    """JSON objects -> a table with a column for every key any row has (not just the first)."""
    if not rows:
        return pa.table({})
    if set(map(type, rows)) != {dict}:  # C-speed checks; the row loop only to name the bad row
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise LabelsError(f"{path}: row {first_row + i}: expected a JSON object, got {type(row).__name__}")
    if len(dict.fromkeys(itertools.chain.from_iterable(rows))) != len(rows[0]):
        return _from_records_loose(rows, None)  # Arrow's from_pylist takes the columns from the first row only
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as exc:
        # Mixed types in one column (e.g. preference 1 and "1.5"): keep such columns as JSON text.
        return _from_records_loose(rows, exc)


def _from_records_loose(rows: list, first_error: Exception | None) -> pa.Table:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    marks: dict[str, list[int]] = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            columns[name] = pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v
                                      for v in values], pa.string())
            marks[name] = [i for i, v in enumerate(values) if isinstance(v, (dict, list))]
    return _with_nontext(pa.table(columns), marks)


def _xlsx_batches(path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """The first sheet, streamed (openpyxl's read-only mode parses the sheet's XML as it goes);
    the first row names the columns. Fully blank rows are kept (all null)."""
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a non-workbook
        raise LabelsError(f"{path}: unreadable as xlsx ({_first_line(exc)})") from None
    n = 0
    try:
        rows = book.active.iter_rows(values_only=True)
        header = next(rows, None)
        if header is None:
            yield pa.table({})
            return
        names = [str(h) if h is not None else f"column_{i}" for i, h in enumerate(header)]
        chunk: list[tuple] = []
        yielded = False
        for row in rows:
            chunk.append(row)
            n += 1
            if len(chunk) >= batch_rows:
                yield _cells_to_table(names, chunk)
                chunk, yielded = [], True
        if chunk or not yielded:
            yield _cells_to_table(names, chunk)
    except LabelsError:
        raise
    except Exception as exc:  # a broken sheet part shows only while iterating
        raise LabelsError(f"{path}: row {n}: unreadable as xlsx ({_first_line(exc)})") from None
    finally:
        book.close()


def _cells_to_table(names: list[str], rows: list[tuple]) -> pa.Table:
    """Sheet rows (tuples of cell values, maybe shorter than the header) -> a table; a column
    whose cells Arrow cannot hold in one type becomes text."""
    width = len(names)
    padded = [tuple(r[:width]) + (None,) * (width - len(r)) if len(r) != width else r for r in rows]
    columns = list(zip(*padded)) if padded else [() for _ in names]
    out = {}
    for name, values in zip(names, columns):
        try:
            out[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            out[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table(out)


# -- writing -----------------------------------------------------------------------------------


class FileWriter:
    """Streaming writer of an export file; the encoding comes from the extension.

    Writes into ``<name>.partial`` and renames on ``close()``, so a failed export leaves no file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        name = self.path.name.lower()
        if name.endswith(".jsonl.gz") or name.endswith(".json.gz") or name.endswith(".gz"):
            self.encoding = ".jsonl.gz"
        else:
            self.encoding = self.path.suffix.lower()
        if self.encoding not in WRITE_ENCODINGS:
            raise LabelsError(f"{path}: cannot write {self.encoding or 'files without an extension'} "
                              f"(use {', '.join(WRITE_ENCODINGS)})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self._parquet = None
        self._csv = None
        self._fh = None
        self._first = True
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        if self.encoding == ".parquet":
            import pyarrow.parquet as pq

            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
            self._parquet.write_table(_align(table, self._parquet.schema))
        elif self.encoding == ".csv":
            self._write_csv(table)
        else:
            self._write_json(table)

    def _write_csv(self, table: pa.Table) -> None:
        import pyarrow.csv as pcsv

        flat = {}
        for name in table.column_names:  # CSV holds no nesting: nested columns become JSON text
            col = table.column(name)
            t = col.type
            nested = pa.types.is_list(t) or pa.types.is_struct(t) or pa.types.is_large_list(t) or pa.types.is_map(t)
            flat[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in col.to_pylist()],
                                  pa.string()) if nested else col
        flat_table = pa.table(flat)
        if self._csv is None:
            self._csv = pcsv.CSVWriter(str(self.tmp), flat_table.schema)
        self._csv.write_table(flat_table)

    def _write_json(self, table: pa.Table) -> None:
        if self._fh is None:
            if self.encoding == ".jsonl.gz":
                self._fh = io.TextIOWrapper(gzip.open(self.tmp, "wb"), encoding="utf-8")
            else:
                self._fh = open(self.tmp, "w", encoding="utf-8")
            if self.encoding == ".json":
                self._fh.write("[\n")
        lines = _json_lines(table)
        if not lines:
            return
        if self.encoding == ".json":
            self._fh.write(("" if self._first else ",\n") + ",\n".join(lines))
        else:
            self._fh.write("\n".join(lines) + "\n")
        self._first = False

    def close(self) -> Path:
        if self._parquet is not None:
            self._parquet.close()
        elif self._csv is not None:
            self._csv.close()
        elif self._fh is not None:
            if self.encoding == ".json":
                self._fh.write("\n]\n")
            self._fh.close()
        else:  # nothing written: an empty file of the right encoding
            if self.encoding == ".parquet":
                import pyarrow.parquet as pq

                pq.write_table(pa.table({}), self.tmp)
            elif self.encoding == ".json":
                self.tmp.write_text("[]\n")
            elif self.encoding == ".jsonl.gz":
                with gzip.open(self.tmp, "wb"):
                    pass
            else:
                self.tmp.write_text("")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        for closer in (self._parquet, self._csv, self._fh):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # already broken; we only clean up
                    pass
        self.tmp.unlink(missing_ok=True)


def _align(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A later batch in the first batch's schema (a column it lacks becomes null; one the
    first batch lacked cannot be added to a Parquet file once started, so it is left out)."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _json_lines(table: pa.Table) -> list[str]:
    """One JSON text per row (pandas' C encoder would reorder nothing but mangles nested nulls)."""
    return [json.dumps(r, ensure_ascii=False, default=str) for r in table.to_pylist()]


def write_file(table: pa.Table, path: str | os.PathLike) -> Path:
    writer = FileWriter(path)
    try:
        writer.write(table)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
