"""The dataset store: a folder of Parquet shards plus ``manifest.json``.

Layout of a dataset folder::

    train-00000.parquet  train-00001.parquet ...  manifest.json

``manifest.json`` holds the kind, schema version, row count, each shard's rows and sha256,
and provenance (producing flow, models, judge, parameters, seed, parent datasets).

Writes are atomic: shards go into ``<name>.partial/`` and the folder is renamed into place
only once the manifest is written, so a killed write never leaves a visible dataset. A
streaming producer writes shard by shard with ``DatasetWriter``; a shard is complete once
listed in ``<name>.partial/progress.json``, so a restarted producer skips the shards it has.

The folder loads with pyarrow alone (``read_dataset`` or ``pyarrow.dataset``) and with
``datasets.load_dataset("parquet", data_dir=path)``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.schemas.kinds import KINDS, SCHEMA_VERSION, optional_type, schema_for
from alignflow.schemas.prompts import normalize_prompt_columns

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT = "alignflow-dataset"
QUARANTINE_KIND = "quarantine"
_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization|credential)", re.I)


class DatasetError(Exception):
    """A dataset folder that cannot be read or written as asked (one-line message)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def scrub_secrets(value: Any) -> Any:
    """Provenance without secrets: values under key names like api_key/token become '***'."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else scrub_secrets(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def conform(table: pa.Table, kind: str) -> pa.Table:
    """Cast ``table`` to the kind's schema (fields first, extras after); raise if impossible."""
    if kind == QUARANTINE_KIND:
        return table
    schema = schema_for(kind)
    table = normalize_prompt_columns(table)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"cannot store as {kind}: missing column(s) {', '.join(missing)}")
    fields = [schema.field(n) for n in schema.names]
    for name in table.column_names:
        if name not in schema.names:
            canonical = optional_type(kind, name)
            fields.append(pa.field(name, canonical if canonical is not None else table.schema.field(name).type))
    table = table.select([f.name for f in fields])
    try:
        return table.cast(pa.schema(fields))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise DatasetError(f"cannot store as {kind}: {str(exc).splitlines()[0]}") from None


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """One shard's Parquet encoding: zstd, and min/max statistics on the scalar non-text columns
    only (margins, scores, labels); statistics of free text (prompts, responses) serve no
    filter and cost about a tenth of the write time.

    Measured and left out (1M-row all-pairs bench, 2 cores): handing repeated texts over as
    dictionary arrays to be stored as dictionary pages saves the copy but not the write, since
    Arrow hashes a given dictionary again (about 3x the cost of writing its texts plainly);
    with compression off as well, the whole conversion reached 4.3M pairs/s, under 20x its
    baseline (the 30x goal needs 7-8M).
    """
    stats = [f.name for f in table.schema if pa.types.is_primitive(f.type)]
    pq.write_table(table, path, compression="zstd", write_statistics=stats)


class DatasetWriter:
    """Write a dataset shard by shard, atomically, resumable after a crash.

    >>> with DatasetWriter("out/pairs", "pairwise", provenance={"flow": "x"}) as w:
    ...     for i, batch in enumerate(batches):
    ...         if w.has_shard(i):   # finished before a crash
    ...             continue
    ...         w.write_shard(batch, i)
    """

    def __init__(self, path: str | os.PathLike, kind: str, provenance: dict | None = None, *, overwrite: bool = False):
        if kind not in KINDS and kind != QUARANTINE_KIND:
            raise DatasetError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        self.path = Path(path)
        self.kind = kind
        self.provenance = scrub_secrets(dict(provenance or {}))
        self.overwrite = overwrite
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.path.exists() and not overwrite:
            raise DatasetError(f"{self.path}: already exists (pass overwrite=True to replace it)")
        self.partial.mkdir(parents=True, exist_ok=True)
        progress = self.partial / PROGRESS
        self._shards: dict[str, dict] = {}
        if progress.exists():
            state = json.loads(progress.read_text())
            if state.get("kind") != kind:
                raise DatasetError(f"{self.partial}: unfinished write of kind {state.get('kind')!r}, not {kind!r}")
            self._shards = {s["key"]: s for s in state["shards"]}
        for stale in self.partial.glob(".*.tmp"):  # shards a killed writer had not finished
            stale.unlink(missing_ok=True)
        self._schema: pa.Schema | None = None
        self._lock = threading.Lock()  # write_shard may run in several threads (one shard each)

    # -- resume support -------------------------------------------------------------------
    def completed_shards(self) -> set[str]:
        """Keys of shards already written (by this or an earlier, interrupted, writer)."""
        return set(self._shards)

    def has_shard(self, key: int | str) -> bool:
        return self._key(key) in self._shards

    def shard_meta(self, key: int | str) -> dict | None:
        """What the producer stored with a finished shard (``write_shard(..., meta=)``), else None."""
        entry = self._shards.get(self._key(key))
        return None if entry is None else entry.get("meta")

    def forget_shards(self, keys: Iterable[int | str]) -> None:
        """Treat these shards as not written (a producer that will write them again)."""
        with self._lock:
            for key in keys:
                entry = self._shards.pop(self._key(key), None)
                if entry is not None:
                    (self.partial / entry["file"]).unlink(missing_ok=True)
            self._save_progress()

    @staticmethod
    def _key(key: int | str) -> str:
        return f"{key:05d}" if isinstance(key, int) else str(key)

    # -- writing --------------------------------------------------------------------------
    def write_shard(self, table: pa.Table, key: int | str | None = None, meta: dict | None = None) -> str:
        """Write one shard atomically; returns its key. An existing key is replaced.

        Thread-safe when each call names its own ``key``: shards written in parallel threads
        (Parquet encoding releases the GIL) are recorded one at a time. ``meta`` (JSON) is kept
        with the shard in the progress file for a resuming producer (``shard_meta``); it does
        not reach the manifest.
        """
        key = self._key(len(self._shards) if key is None else key)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise DatasetError(f"shard key {key!r} must be letters, digits, '.', '_' or '-'")
        table = conform(table, self.kind)
        name = f"train-{key}.parquet"
        tmp = self.partial / f".{name}.{uuid.uuid4().hex}.tmp"
        write_parquet(table, tmp)
        os.replace(tmp, self.partial / name)
        entry = {"key": key, "file": name, "rows": table.num_rows, "sha256": sha256_file(self.partial / name)}
        if meta is not None:
            entry["meta"] = meta
        with self._lock:
            self._shards[key] = entry
            self._save_progress()
        return key

    def write_batches(self, batches: Iterable[pa.Table | pa.RecordBatch], rows_per_shard: int = 250_000) -> None:
        """Stream tables/record batches into shards of about ``rows_per_shard`` rows."""
        pending: list[pa.Table] = []
        count = 0
        for batch in batches:
            t = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            pending.append(t)
            count += t.num_rows
            if count >= rows_per_shard:
                self.write_shard(pa.concat_tables(pending, promote_options="permissive"))
                pending, count = [], 0
        if pending:
            self.write_shard(pa.concat_tables(pending, promote_options="permissive"))

    def _save_progress(self) -> None:
        state = {"kind": self.kind, "shards": [self._shards[k] for k in sorted(self._shards)]}
        _atomic_write_text(self.partial / PROGRESS, json.dumps(state, indent=1))

    def commit(self, extra_provenance: dict | None = None) -> Path:
        """Write the manifest and move the dataset into place (atomic rename)."""
        if not self._shards:  # an empty dataset still has one (empty) shard carrying its schema
            empty = schema_for(self.kind).empty_table() if self.kind != QUARANTINE_KIND else _empty_quarantine()
            self.write_shard(empty, 0)
        shards = [self._shards[k] for k in sorted(self._shards)]
        schema = pq.read_schema(self.partial / shards[0]["file"])
        provenance = dict(self.provenance)
        provenance.update(scrub_secrets(extra_provenance or {}))
        manifest = {
            "format": FORMAT,
            "kind": self.kind,
            "schema_version": SCHEMA_VERSION,
            "num_rows": sum(s["rows"] for s in shards),
            "shards": [{"file": s["file"], "rows": s["rows"], "sha256": s["sha256"]} for s in shards],
            "columns": {f.name: str(f.type) for f in schema},
            "provenance": provenance,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _atomic_write_text(self.partial / MANIFEST, json.dumps(manifest, indent=2, default=str))
        (self.partial / PROGRESS).unlink(missing_ok=True)
        _move_into_place(self.partial, self.path, self.overwrite)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        # on error the partial folder stays, so a rerun resumes from the finished shards


def _empty_quarantine() -> pa.Table:
    from alignflow.schemas.validate import QUARANTINE_SCHEMA

    return QUARANTINE_SCHEMA.empty_table()


def _move_into_place(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise DatasetError(f"{dst}: already exists (pass overwrite=True to replace it)")
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def write_dataset(
    path: str | os.PathLike,
    table: pa.Table,
    kind: str,
    provenance: dict | None = None,
    *,
    rows_per_shard: int = 250_000,
    overwrite: bool = False,
) -> Path:
    """Write ``table`` as a dataset of ``kind`` at ``path``, atomically."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a one-shot write does not resume
    writer = DatasetWriter(path, kind, provenance, overwrite=overwrite)
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        writer.write_shard(table.slice(start, rows_per_shard), i)
    return writer.commit()


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset folder")
    mpath = path / MANIFEST
    if not mpath.exists():
        hint = " (an unfinished write?)" if path.name.endswith(".partial") else ""
        raise DatasetError(f"{path}: no {MANIFEST}, not an alignflow dataset{hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{mpath}: not an alignflow manifest (format field missing or wrong)")
    for key in ("kind", "schema_version", "num_rows", "shards"):
        if key not in manifest:
            raise DatasetError(f"{mpath}: manifest lacks field {key!r}")
    if manifest["kind"] not in KINDS and manifest["kind"] != QUARANTINE_KIND:
        raise DatasetError(f"{mpath}: unknown kind {manifest['kind']!r}")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise DatasetError(f"{mpath}: schema version {manifest['schema_version']} is newer than this alignflow ({SCHEMA_VERSION})")
    return manifest


def verify_dataset(path: str | os.PathLike) -> dict:
    """Check every shard's presence, sha256 and row count; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    total = 0
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.exists():
            raise DatasetError(f"{file}: shard listed in the manifest is missing")
        if sha256_file(file) != shard["sha256"]:
            raise DatasetError(f"{file}: checksum mismatch (the shard changed after it was written)")
        total += shard["rows"]
    if total != manifest["num_rows"]:
        raise DatasetError(f"{path / MANIFEST}: shard rows add up to {total}, manifest says {manifest['num_rows']}")
    return manifest


def shard_paths(path: str | os.PathLike, *, verify: bool = True) -> list[Path]:
    path = Path(path)
    manifest = verify_dataset(path) if verify else read_manifest(path)
    return [path / s["file"] for s in manifest["shards"]]


def read_dataset(path: str | os.PathLike, *, columns: list[str] | None = None, verify: bool = True) -> pa.Table:
    """The whole dataset as one Arrow table (checksums verified unless ``verify=False``)."""
    files = shard_paths(path, verify=verify)
    tables = [pq.read_table(f, columns=columns) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def iter_batches(path: str | os.PathLike, batch_size: int = 65_536, *, columns: list[str] | None = None,
                 verify: bool = True) -> Iterator[pa.RecordBatch]:
    """Stream the dataset as record batches (memory independent of its size)."""
    for f in shard_paths(path, verify=verify):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def dataset_kind(path: str | os.PathLike) -> str:
    return read_manifest(path)["kind"]


def is_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()
