"""File IO for label files: read any supported encoding as Arrow record batches, write exports.

Encodings are taken from the file name: ``.jsonl``, ``.jsonl.gz`` (and ``.json.gz``), ``.json``
(an array of objects, or an object holding one), ``.parquet``, ``.csv`` and ``.xlsx``.
Parquet, CSV and JSONL stream in record batches (memory independent of the file size); a
``.json`` array and an ``.xlsx`` sheet are whole-document formats and are read at once.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from feedback.labels.errors import LabelsError

BATCH_ROWS = 65_536
BLOCK_BYTES = 1 << 24  # Arrow's JSON / CSV readers parse (and infer types) block by block
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


def iter_file_batches(path: str | os.PathLike, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Stream ``path`` as Arrow tables of about ``batch_rows`` rows (row order kept)."""
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
            yield from _jsonl_batches(path, batch_rows)
        elif ext == ".json":
            yield from _slices(_read_json_document(path), batch_rows)
        elif ext == ".xlsx":
            yield from _slices(_read_xlsx(path), batch_rows)
    except LabelsError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError, EOFError, ValueError) as exc:
        raise LabelsError(f"{path}: unreadable as {ext[1:]} ({_first_line(exc)})") from None


def read_file(path: str | os.PathLike) -> pa.Table:
    """The whole file as one table (for formats that group rows across the file)."""
    tables = list(iter_file_batches(path))
    if not tables:
        return pa.table({})
    return concat_loose(tables)


def concat_loose(tables: list[pa.Table]) -> pa.Table:
    """Concatenate batches whose types may differ (streamed readers infer per block): columns
    that cannot be promoted to one type become text (nested values as JSON)."""
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    mixed = {name for name, ts in types.items() if len({t for t in ts if not pa.types.is_null(t)}) > 1}
    fixed = []
    for t in tables:
        for name in mixed & set(t.column_names):
            col = t.column(name)
            nested = pa.types.is_nested(col.type)
            as_text = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) if nested else str(v)
                                for v in col.to_pylist()], pa.string()) if nested or not pa.types.is_string(col.type) \
                else col
            t = t.set_column(t.schema.get_field_index(name), name, as_text)
        fixed.append(t)
    return pa.concat_tables(fixed, promote_options="permissive")


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
                yield table
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
    skipped = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        if skipped < done:  # rows already yielded with the first block's types
            drop = min(done - skipped, table.num_rows)
            skipped += drop
            table = table.slice(drop)
        if table.num_rows:
            yield from _slices(table, batch_rows)


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_batches(path: Path, batch_rows: int) -> Iterator[pa.Table]:
    """JSON lines, streamed: Arrow's reader block by block; Python's json where Arrow gives up.

    Arrow infers types from the first block; label files often have a field that is null for
    thousands of rows and then a string (or a struct whose keys vary). When a block does not
    fit, the remaining lines are parsed with ``json`` in chunks of ``batch_rows`` (each chunk
    gets its own Arrow types; the readers take any).
    """
    import pyarrow.json as pjson

    done = 0
    try:
        stream = pa.input_stream(str(path), compression="gzip" if path.name.lower().endswith(".gz") else None)
        with pjson.open_json(stream, read_options=pjson.ReadOptions(block_size=BLOCK_BYTES)) as reader:
            for batch in reader:
                for table in _slices(pa.Table.from_batches([batch]), batch_rows):
                    yield table
                    done += table.num_rows
        return
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    rows: list = []
    seen = 0
    with _open_text(path) as fh:
        for number, line in enumerate(fh):
            if not line.strip():
                continue
            seen += 1
            if seen <= done:  # already yielded by Arrow's reader
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LabelsError(f"{path}: row {seen - 1}: line {number + 1} is not JSON ({exc.msg})") from None
            if len(rows) >= batch_rows:
                yield _from_records(rows, path, seen - len(rows))
                rows = []
    if rows or not done:
        yield _from_records(rows, path, seen - len(rows))


def _read_json_document(path: Path) -> pa.Table:
    with open(path, encoding="utf-8") as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise LabelsError(f"{path}: unreadable as json ({exc.msg} at line {exc.lineno})") from None
    if isinstance(doc, dict):  # {"data": [...]} or {"rows": [...]} wrappers
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LabelsError(f"{path}: row 0: expected a JSON array of objects (or an object holding one)")
        doc = lists[0]
    if not isinstance(doc, list):
        raise LabelsError(f"{path}: row 0: expected a JSON array of objects")
    return _from_records(doc, path)


def _from_records(rows: list, path: Path, first_row: int = 0) -> pa.Table:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LabelsError(f"{path}: row {first_row + i}: expected a JSON object, got {type(row).__name__}")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        # Mixed types in one column (e.g. preference 1 and "1.5"): keep such columns as JSON text.
        return _from_records_loose(rows, exc)


def _from_records_loose(rows: list, first_error: Exception) -> pa.Table:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v
                                      for v in values], pa.string())
    return pa.table(columns)


def _read_xlsx(path: Path) -> pa.Table:
    """The first sheet; the first row names the columns. Fully blank rows are kept (all null)."""
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a non-workbook
        raise LabelsError(f"{path}: unreadable as xlsx ({_first_line(exc)})") from None
    rows = book.active.iter_rows(values_only=True)
    header = next(rows, None)
    if header is None:
        return pa.table({})
    names = [str(h) if h is not None else f"column_{i}" for i, h in enumerate(header)]
    columns: list[list] = [[] for _ in names]
    for row in rows:
        for i in range(len(names)):
            columns[i].append(row[i] if i < len(row) else None)
    book.close()
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
