"""The dataset store: a folder of Parquet shards plus ``_manifest.json``.

Layout of a dataset folder::

    train-00000.parquet  train-00001.parquet ...  _manifest.json

``_manifest.json`` holds the kind, schema version, row count, each shard's rows and sha256,
and provenance (producing flow, models, judge, parameters, seed, parent datasets). Its name
starts with ``_`` because Arrow, pandas and Spark skip ``_``- and ``.``-prefixed files: the
folder opens unchanged with ``pandas.read_parquet(PATH)``, ``pyarrow.parquet.read_table(PATH)``,
``pyarrow.dataset.dataset(PATH)``, ``datasets.load_dataset(PATH)``, DuckDB's
``read_parquet('PATH/*.parquet')`` and polars on the shards (tests/test_hostile.py opens one
with each). Folders written before (``manifest.json``) are still read.

Writes are atomic and never destroy what is not theirs:

* shards go into ``<name>.partial/`` and the folder is renamed into place only once the
  manifest is written, so a killed write never leaves a visible dataset;
* the target must be absent, an empty folder, or (with ``overwrite=True``) a dataset of the
  same kind; a file, a folder of other files or a dataset of another kind is refused;
* one writer at a time: the ``.partial`` folder is locked (``flock``) for the whole write, so a
  second writer of the same dataset fails at once;
* a replaced dataset is moved aside to ``<name>.partial.old`` (a fixed name: a write killed in
  the middle of the swap is repaired by the next writer) and deleted.

A streaming producer writes shard by shard with ``DatasetWriter``; a shard is complete once
listed in ``<name>.partial/progress.json``, so a restarted producer skips the shards it has.
Shard names in manifests and progress files must be plain file names inside the folder.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.schemas.kinds import KINDS, SCHEMA_VERSION, optional_type, schema_for
from alignflow.schemas.prompts import normalize_prompt_columns

MANIFEST = "_manifest.json"
LEGACY_MANIFEST = "manifest.json"  # folders written before the manifest got its "_" (still read)
PROGRESS = "progress.json"
RESUME_DIR = ".resume"  # a producer's own state inside the partial folder (feedback.labels.convert)
FORMAT = "alignflow-dataset"
QUARANTINE_KIND = "quarantine"
# "token" as in an access token, not a count or a tokenizer (max_new_tokens, tokenizer stay visible)
_SECRET_KEY = re.compile(r"(api[_-]?key|token(?!s|izer)|secret|password|authorization|credential)", re.I)


class DatasetError(Exception):
    """A dataset folder that cannot be read or written as asked (one-line message)."""


class UnfinishedWriteOfAnotherKind(DatasetError):
    """``<name>.partial`` holds an interrupted write of another kind (a fresh write may clear it)."""


def plain_file_name(name: Any) -> bool:
    """A file name that stays inside its folder: no separators, not ``.``/``..``, no NUL."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..")
            and not any(c in name for c in ("/", "\\", "\x00")))


def shard_name_ok(name: Any) -> bool:
    """A shard file name a manifest may list: plain, ``.parquet``, not hidden from other readers."""
    return plain_file_name(name) and name.endswith(".parquet") and not name.startswith(("_", "."))


def manifest_file(path: str | os.PathLike) -> Path:
    """The manifest of a dataset folder (``_manifest.json``, or ``manifest.json`` of older folders)."""
    path = Path(path)
    new = path / MANIFEST
    return new if new.is_file() or not (path / LEGACY_MANIFEST).is_file() else path / LEGACY_MANIFEST


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def scrub_secrets(value: Any) -> Any:
    """Provenance without secrets: text under key names like api_key/token becomes '***'.

    A secret is text: numbers and flags under such names (``max_new_tokens``) are kept."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v else scrub_secrets(v))
                for k, v in value.items()}
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

    def __init__(self, path: str | os.PathLike, kind: str, provenance: dict | None = None, *, overwrite: bool = False,
                 resume: bool = True):
        if kind not in KINDS and kind != QUARANTINE_KIND:
            raise DatasetError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        self.path = Path(path)
        self.kind = kind
        self.provenance = scrub_secrets(dict(provenance or {}))
        self.overwrite = overwrite
        self.partial = self.path.with_name(self.path.name + ".partial")
        check_target(self.path, kind, overwrite)
        self._lock_fd: int | None = None
        self._lock_partial()
        try:
            _repair_swap(self.path)
            check_target(self.path, kind, overwrite)  # again, now that no other writer can change it
            self._shards: dict[str, dict] = {}
            if resume:
                self._shards = _load_progress(self.partial, kind)
            else:  # a one-shot write starts from nothing
                _clear_partial(self.partial)
            for stale in self.partial.glob(".*.tmp"):  # shards a killed writer had not finished
                stale.unlink(missing_ok=True)
        except BaseException:
            self.release()
            raise
        self._schema: pa.Schema | None = None
        self._lock = threading.Lock()  # write_shard may run in several threads (one shard each)

    def _lock_partial(self) -> None:
        """Create ``<name>.partial`` if needed and hold an exclusive ``flock`` on it until the write
        ends (commit, abort, or this process's death): a second writer fails at once."""
        for _ in range(5):
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.partial.mkdir(exist_ok=True)
                fd = os.open(self.partial, os.O_RDONLY | os.O_DIRECTORY)
            except FileExistsError:
                raise DatasetError(f"{self.partial}: exists and is not a folder; move it away") from None
            except FileNotFoundError:  # another writer just committed (renamed it): try again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DatasetError(f"{self.path}: another process is writing this dataset ({self.partial.name} is "
                                   "locked); wait for it to finish or write elsewhere") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.partial))
            except FileNotFoundError:
                same = False
            if same:  # still the folder at that name (not one a finished writer renamed away)
                self._lock_fd = fd
                # closes the fd if the writer is dropped unreleased; runs at most once (release calls it)
                self._unlock = weakref.finalize(self, _close_fd, fd)
                return
            os.close(fd)
        raise DatasetError(f"{self.partial}: could not lock it (it keeps changing); is another writer running?")

    def release(self) -> None:
        """Give up the write lock (the partial folder stays for a rerun to go on from)."""
        if self._lock_fd is not None:
            self._lock_fd = None
            self._unlock()  # never close the number twice: it may name another file by then

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
        check_target(self.path, self.kind, self.overwrite)
        _move_into_place(self.partial, self.path)
        self.release()
        return self.path

    def abort(self) -> None:
        if self._lock_fd is not None:  # only the lock holder may remove the partial folder
            shutil.rmtree(self.partial, ignore_errors=True)
            self.release()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        # on error the partial folder stays, so a rerun resumes from the finished shards
        self.release()


def _empty_quarantine() -> pa.Table:
    from alignflow.schemas.validate import QUARANTINE_SCHEMA

    return QUARANTINE_SCHEMA.empty_table()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _old_of(path: Path) -> Path:
    return path.with_name(path.name + ".partial.old")


def _entries(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def check_target(path: str | os.PathLike, kind: str, overwrite: bool) -> None:
    """Refuse to write a ``kind`` dataset at ``path`` where that would destroy something else.

    Allowed: nothing there, an empty folder, or (only with ``overwrite``) an alignflow dataset of
    the same kind. Refused with a one-line ``DatasetError``: a file, a folder holding other
    things, a dataset of another kind, an existing dataset without ``overwrite``.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise DatasetError(f"{path}: exists and is not a dataset folder; refusing to replace it "
                           "(choose another output)")
    if not _entries(path):
        return
    if not is_dataset(path):
        raise DatasetError(f"{path}: a folder holding other files, not an alignflow dataset; refusing to replace it "
                           "(choose a new or empty folder)")
    try:
        existing = read_manifest(path)["kind"]
    except DatasetError as exc:
        raise DatasetError(f"{path}: holds a dataset alignflow cannot read ({exc}); refusing to replace it") from None
    if existing != kind:
        raise DatasetError(f"{path}: holds a {existing} dataset; refusing to replace it with {kind} data "
                           "(choose another output, or delete it first)")
    if not overwrite:
        raise DatasetError(f"{path}: already exists (pass --overwrite / overwrite=True to replace it)")


def check_separate(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output") -> None:
    """Refuse an output that is an input, holds one, or lies inside an input folder."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise DatasetError(f"{out}: the {what} would replace the input {item}; choose another {what}")
        if source.is_dir() and source in target.parents:
            raise DatasetError(f"{out}: the {what} lies inside the input folder {item}; choose another {what}")


_OUR_PARTIAL_ENTRY = re.compile(r"(progress\.json|_?manifest\.json|train-[A-Za-z0-9_.-]+\.parquet|\..*\.tmp|\.resume)")


def _load_progress(partial: Path, kind: str) -> dict[str, dict]:
    """The finished shards an interrupted writer recorded; every entry checked (plain names only)."""
    foreign = [e for e in _entries(partial) if not _OUR_PARTIAL_ENTRY.fullmatch(e)]
    if foreign:
        raise DatasetError(f"{partial}: holds files alignflow did not write ({', '.join(foreign[:3])}); move it away")
    progress = partial / PROGRESS
    if not progress.exists():
        return {}
    try:
        state = json.loads(progress.read_text())
        shards = state["shards"]
        if not isinstance(shards, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DatasetError(f"{progress}: unreadable progress file; delete {partial} to start over") from None
    if state.get("kind") != kind:
        raise UnfinishedWriteOfAnotherKind(f"{partial}: unfinished write of kind {state.get('kind')!r}, not {kind!r}")
    out = {}
    for entry in shards:
        key = entry.get("key") if isinstance(entry, dict) else None
        if (not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key in (".", "..")
                or entry.get("file") != f"train-{key}.parquet" or not shard_name_ok(entry["file"])):
            raise DatasetError(f"{progress}: shard entry {json.dumps(entry, default=str)[:120]} is not a shard of "
                               f"this folder; delete {partial} to start over")
        out[key] = entry
    return out


def _clear_partial(partial: Path) -> None:
    """Empty our (locked) partial folder for a fresh write."""
    foreign = [e for e in _entries(partial) if not _OUR_PARTIAL_ENTRY.fullmatch(e)]
    if foreign:
        raise DatasetError(f"{partial}: holds files alignflow did not write ({', '.join(foreign[:3])}); move it away")
    for name in _entries(partial):
        item = partial / name
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink(missing_ok=True)


def _repair_swap(path: Path) -> None:
    """Finish or undo a replacement a killed writer left half done (``<name>.partial.old``)."""
    old = _old_of(path)
    if not old.is_dir() or not is_dataset(old):
        return
    if os.path.lexists(path):
        shutil.rmtree(old)  # the new dataset is in place: the old one only waited to be deleted
    else:
        os.replace(old, path)  # killed between the two renames: the old dataset goes back


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename the finished partial folder to ``dst`` (checked by ``check_target`` just before)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dst) and _entries(dst):  # a dataset of the same kind, replaced as asked
        old = _old_of(dst)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)  # absent, or an empty folder (rename replaces an empty directory)


def write_dataset(
    path: str | os.PathLike,
    table: pa.Table,
    kind: str,
    provenance: dict | None = None,
    *,
    rows_per_shard: int = 250_000,
    overwrite: bool = False,
) -> Path:
    """Write ``table`` as a dataset of ``kind`` at ``path``, atomically (see ``check_target``)."""
    writer = DatasetWriter(path, kind, provenance, overwrite=overwrite, resume=False)
    try:
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
            writer.write_shard(table.slice(start, rows_per_shard), i)
        return writer.commit()
    finally:
        writer.release()


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset folder")
    mpath = manifest_file(path)
    if not mpath.is_file():
        hint = " (an unfinished write?)" if path.name.endswith(".partial") else ""
        raise DatasetError(f"{path}: no {MANIFEST}, not an alignflow dataset{hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{mpath}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{mpath}: not an alignflow manifest (format field missing or wrong)")
    for key in ("kind", "schema_version", "num_rows", "shards"):
        if key not in manifest:
            raise DatasetError(f"{mpath}: manifest lacks field {key!r}")
    if manifest["kind"] not in KINDS and manifest["kind"] != QUARANTINE_KIND:
        raise DatasetError(f"{mpath}: unknown kind {manifest['kind']!r}")
    if not isinstance(manifest["schema_version"], int) or manifest["schema_version"] > SCHEMA_VERSION:
        raise DatasetError(f"{mpath}: schema version {manifest['schema_version']} is newer than this alignflow "
                           f"({SCHEMA_VERSION})")
    if not isinstance(manifest["shards"], list) or not manifest["shards"]:
        raise DatasetError(f"{mpath}: manifest lists no shards")
    for shard in manifest["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        if not shard_name_ok(name):
            raise DatasetError(f"{mpath}: shard {str(name)[:80]!r} is not a plain .parquet file name inside the folder")
        if not isinstance(shard.get("rows"), int) or shard["rows"] < 0 or not isinstance(shard.get("sha256"), str):
            raise DatasetError(f"{mpath}: shard {name}: rows or sha256 missing or malformed")
    return manifest


def _regular_shard(path: Path, shard: dict) -> Path:
    """The shard's path, once it is known to be a regular file (no link, device or pipe)."""
    file = path / shard["file"]
    try:
        mode = os.lstat(file).st_mode
    except FileNotFoundError:
        raise DatasetError(f"{file}: shard listed in the manifest is missing") from None
    if not stat.S_ISREG(mode):
        raise DatasetError(f"{file}: shard is not a regular file (a link, device or folder); refusing to read it")
    return file


def verify_dataset(path: str | os.PathLike) -> dict:
    """Check every shard: a regular file, its sha256, and its row count against the Parquet footer
    and the manifest's total; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    total = 0
    for shard in manifest["shards"]:
        file = _regular_shard(path, shard)
        if sha256_file(file) != shard["sha256"]:
            raise DatasetError(f"{file}: checksum mismatch (the shard changed after it was written)")
        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{file}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        if rows != shard["rows"]:
            raise DatasetError(f"{file}: holds {rows} rows, the manifest says {shard['rows']}")
        total += shard["rows"]
    if total != manifest["num_rows"]:
        raise DatasetError(f"{manifest_file(path)}: shard rows add up to {total}, manifest says {manifest['num_rows']}")
    return manifest


def unlisted_files(path: str | os.PathLike) -> list[str]:
    """Names in a dataset folder that its manifest does not list (the manifest itself aside).

    Other readers (pandas, pyarrow, ``datasets``) take every name not starting with ``_`` or ``.``
    as data, so such a file makes them see another dataset than alignflow does."""
    path = Path(path)
    listed = {s["file"] for s in read_manifest(path)["shards"]} | {MANIFEST, LEGACY_MANIFEST}
    return [name for name in _entries(path) if name not in listed]


def shard_paths(path: str | os.PathLike, *, verify: bool = True) -> list[Path]:
    path = Path(path)
    manifest = verify_dataset(path) if verify else read_manifest(path)
    return [_regular_shard(path, s) for s in manifest["shards"]]


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
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / LEGACY_MANIFEST).is_file()
