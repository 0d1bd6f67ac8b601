"""The conversion pipeline: read a label file, validate, convert kinds, write, account for every row.

``convert_labels_file(IN, OUT, from_fmt, to_fmt, ...)`` streams record batches through
read -> parse -> validate (``schemas.validate``) -> kind conversion -> write and returns a
``Report`` whose accounting always adds up: every source record is written, quarantined
(bad row, with a reason) or dropped by rule (a tie a pair cannot hold, a blank row, ...).

Store outputs are written shard by shard with a checkpoint each; a run that was killed or
failed is resumed by running it again with the same input and options (see ``_Sink``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels import conversions as cv
from alignflow.feedback.labels.columns import one_array
from alignflow.feedback.labels.errors import LabelsError
from alignflow.feedback.labels.formats import CANONICAL, Format, Parsed, ReadContext, get_format, read_batch
from alignflow.feedback.labels.io import BATCH_ROWS, FileWriter, concat_loose, iter_file_batches
from alignflow.feedback.labels.limits import MAX_FIELD_BYTES, is_text_type, mib, oversized_rows
from alignflow.schemas.validate import QUARANTINE_SCHEMA, validate

TIES = ("drop", "keep")
MULTI_TURN = ("quarantine", "whole")
INTERNAL_COLUMNS = ("_row", "_nrec", "_cid", "tie", "both_bad")


@dataclass
class Options:
    strategy: str = "all-pairs"
    ties: str = "drop"
    aspect: str | None = None
    aggregate: str = "majority"
    threshold: float | None = None
    top_k: int = 1
    style: str | None = None
    fields: dict[str, str] | str | None = None  # the source format's own field options (--fields k=v,...)
    multi_turn: str = "quarantine"  # arena battles whose earlier turns differ: quarantine or keep whole
    max_field_mb: float = MAX_FIELD_BYTES / (1 << 20)  # one text value at most (a record: 4 times that)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def field_map(self) -> dict[str, str]:
        """``--fields`` as a dict (``"a=b,c=d"`` or a dict)."""
        if not self.fields:
            return {}
        if isinstance(self.fields, dict):
            return dict(self.fields)
        out = {}
        for part in self.fields.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise LabelsError(f"--fields {self.fields!r}: expected name=value pairs separated by commas")
            out[key.strip()] = value.strip()
        return out

    @property
    def max_field_bytes(self) -> int:
        return int(self.max_field_mb * (1 << 20))


@dataclass
class Report:
    """Accounting in source records: ``read == written + quarantined + dropped``."""

    source_format: str
    target_format: str
    read: int = 0
    written: int = 0
    quarantined: int = 0
    dropped: Counter = field(default_factory=Counter)
    quarantine_reasons: Counter = field(default_factory=Counter)
    rows_out: int = 0
    tie_pairs: int = 0
    identical_pairs: int = 0
    duplicates: int = 0  # canonical rows that repeat an earlier one (kept; see _Duplicates)
    info: dict = field(default_factory=dict)
    output: str | None = None
    quarantine_path: str | None = None

    @property
    def dropped_total(self) -> int:
        return int(sum(self.dropped.values()))

    @property
    def adds_up(self) -> bool:
        return self.read == self.written + self.quarantined + self.dropped_total

    def line(self) -> str:
        return (f"read {self.read} = written {self.written} + quarantined {self.quarantined} + "
                f"dropped-by-rule {self.dropped_total} (records); {self.rows_out} {self.target_format} rows out")

    def details(self) -> list[str]:
        out = []
        for reason, n in self.quarantine_reasons.most_common():
            out.append(f"  quarantined {n}: {reason}")
        for reason, n in self.dropped.most_common():
            out.append(f"  dropped-by-rule {n}: {reason}")
        if self.tie_pairs:
            out.append(f"  tie pairs left out (a pair cannot hold a tie): {self.tie_pairs}")
        if self.identical_pairs:
            out.append(f"  pairs of identical texts left out: {self.identical_pairs}")
        if self.duplicates:
            out.append(f"  duplicates: {self.duplicates} rows repeat an earlier row (kept)")
        for key in ("agreement_summary", "aspect"):
            if key in self.info:
                out.append(f"  {self.info[key]}")
        if "resumed" in self.info:
            resumed = self.info["resumed"]
            out.append(f"  resumed an interrupted run: its first {resumed['shards']} shards ({resumed['records']} "
                       f"records) were kept, the rest converted now")
        if self.info.get("intransitive_prompts") is not None:
            out.append(f"  Bradley-Terry order: {len(self.info['intransitive_prompts'])} prompts with intransitive "
                       f"cycles; Copeland disagrees on {self.info.get('copeland_disagreements', 0)}")
        return out

    def as_dict(self) -> dict:
        return {"read": self.read, "written": self.written, "quarantined": self.quarantined,
                "dropped_by_rule": self.dropped_total, "dropped_reasons": dict(self.dropped),
                "quarantine_reasons": dict(self.quarantine_reasons), "rows_out": self.rows_out,
                "tie_pairs_left_out": self.tie_pairs, "identical_pairs_left_out": self.identical_pairs,
                "duplicates": self.duplicates}


def target_kind(fmt: Format) -> str:
    if fmt.name in CANONICAL:
        return fmt.name
    if fmt.export is None:
        raise LabelsError(f"format {fmt.name!r} is import-only; export formats: "
                          f"{', '.join(n for n, f in _formats().items() if f.export)}")
    return "listwise" if fmt.kind == "ratings" else fmt.kind


def known_rows(path: str | os.PathLike) -> int | None:
    """The input's row count when it is written down (Parquet footer, dataset manifest), else None."""
    from alignflow.schemas.store import DatasetError, is_dataset, read_manifest

    path = Path(path)
    try:
        if path.is_dir() and is_dataset(path):
            return int(read_manifest(path)["num_rows"])
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException, DatasetError):  # unreadable: the conversion reports it, with file and field
        return None
    return None


def _formats():
    from alignflow.feedback.labels.formats import FORMATS

    return FORMATS


def source_batches(path: str | os.PathLike, fmt: Format, batch_rows: int = BATCH_ROWS,
                   max_field_bytes: int = MAX_FIELD_BYTES) -> Iterator[pa.Table]:
    """Raw batches of the input: a store dataset folder (canonical kinds) or a file."""
    from alignflow.schemas.store import is_dataset, iter_batches

    if Path(path).is_dir():
        if not is_dataset(path):
            raise LabelsError(f"{path}: a folder but not an alignflow dataset (no _manifest.json)")
        for batch in iter_batches(path, batch_rows):
            yield pa.Table.from_batches([batch])
        return
    yield from iter_file_batches(path, batch_rows, max_field_bytes)


def prefetch(batches: Iterator[pa.Table], depth: int = 1) -> Iterator[pa.Table]:
    """Produce the next batch (read and parsed) in a background thread while this one is converted.

    Arrow's readers and kernels release the GIL, so reading, converting and writing overlap
    on two cores; ``depth`` bounds how many batches wait (memory stays flat).
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="labels-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _whole(batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
    tables = list(batches)
    if tables:
        yield concat_loose(tables)


def _strip(table: pa.Table) -> pa.Table:
    return table.drop_columns([c for c in INTERNAL_COLUMNS if c in table.column_names])


def _tie_mask(table: pa.Table) -> np.ndarray:
    if "tie" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return pc.fill_null(table.column("tie"), False).to_numpy(zero_copy_only=False)


def convert_kind(table: pa.Table, src: str, dst: str, options: Options,
                 source: str | None = None) -> tuple[pa.Table, cv.Stats]:
    """Canonical rows of kind ``src`` -> ``dst`` (rows keep ``_row`` / ``_nrec``); pairs made from
    lists get ``source`` (who gave the labels; None: unknown)."""
    if dst == "prompts":  # prompts -> prompts too: one row per prompt
        return cv.to_prompts(table, src)
    if src == dst == "pairwise":
        stats = cv.Stats()
        tie = _tie_mask(table)
        reason = "tie (--ties drop)" if options.ties == "drop" else "tie (a pair cannot hold a tie)"
        return cv._drop_rows(table, tie, reason, stats), stats
    if src == dst == "listwise":
        stats = cv.Stats()
        if options.ties == "drop":
            scores = one_array(table.column("scores"))
            same = pc.equal(pc.list_value_length(scores), 0)
            if len(scores):
                lengths = pc.list_value_length(scores).to_numpy(zero_copy_only=False).astype(np.int64)
                flat = pc.list_flatten(scores).to_numpy(zero_copy_only=False)
                starts = cv._starts(lengths)
                hi = np.maximum.reduceat(flat, starts) if len(flat) else np.zeros(0)
                lo = np.minimum.reduceat(flat, starts) if len(flat) else np.zeros(0)
                same = hi == lo
            table = cv._drop_rows(table, np.asarray(same, dtype=bool), "all responses tie (--ties drop)", stats)
        return table, stats
    if src == dst:
        return table, cv.Stats()
    if src == "listwise" and dst == "pairwise":
        return cv.listwise_to_pairwise(table, options.strategy, source=source)
    if src == "pairwise" and dst == "listwise":
        return cv.pairwise_to_listwise(table, options.ties)
    if src == "pairwise" and dst == "binary":
        return cv.pairwise_to_binary(table, options.ties)
    if src == "listwise" and dst == "binary":
        return cv.listwise_to_binary(table, options.threshold, options.top_k, options.ties)
    if dst == "sft" and src in ("pairwise", "listwise", "binary"):
        return cv.to_sft(table, src)
    raise LabelsError(f"cannot convert {src} rows to {dst} (known: listwise->pairwise|binary|sft, "
                      f"pairwise->listwise|binary|sft, binary->sft, any->prompts)")


def _validated(parsed: Parsed, report: Report, quarantine: list[pa.Table], min_responses: int = 2) -> pa.Table:
    """Run the canonical checks; quarantined rows are reported by their source row numbers.

    A tie between two identical texts (alpaca-eval's draws of equal outputs) says nothing: it is
    dropped by rule, not quarantined as an error (a chosen equal to its rejected without a tie is).
    """
    if parsed.quarantine is not None and parsed.quarantine.num_rows:
        quarantine.append(parsed.quarantine)
        report.quarantined += parsed.quarantine.num_rows
        for r in parsed.quarantine.column("reason").to_pylist():
            report.quarantine_reasons[r] += 1
    kind = "listwise" if parsed.kind == "ratings" else parsed.kind
    table = parsed.table
    if kind == "pairwise" and "tie" in table.column_names and table.num_rows:
        same = pc.fill_null(pc.and_(pc.equal(table.column("chosen"), table.column("rejected")), table.column("tie")),
                            False).to_numpy(zero_copy_only=False)
        if same.any():
            report.dropped["tie of two identical texts (nothing to compare)"] += int(table.column("_nrec").to_numpy()[same].sum())
            table = parsed.table = table.filter(pa.array(~same))
    result = validate(table, kind, min_responses=min_responses)
    if result.quarantined.num_rows:
        idx = result.quarantined.column("row").to_numpy()
        src_rows = parsed.table.column("_row").to_numpy()[idx]
        nrec = parsed.table.column("_nrec").to_numpy()[idx]
        q = result.quarantined.set_column(0, "row", pa.array(src_rows.astype(np.int64)))
        q = q.set_column(2, "record", pa.array([_public_record(r) for r in q.column("record").to_pylist()], pa.string()))
        quarantine.append(q.cast(QUARANTINE_SCHEMA))
        report.quarantined += int(nrec.sum())
        for reason, n in zip(q.column("reason").to_pylist(), nrec):
            report.quarantine_reasons[reason] += int(n)
    return result.valid


def _public_record(record: str) -> str:
    """A quarantined canonical row as JSON without the pipeline's bookkeeping columns."""
    import json

    row = json.loads(record)
    for key in ("_row", "_nrec"):
        row.pop(key, None)
    return json.dumps(row, ensure_ascii=False, default=str)


RESUME_DIR = ".resume"  # in the partial folder: rows quarantined per checkpoint (removed at commit)


class _Sink:
    """Where converted rows go: a store dataset (canonical kinds) or an export file.

    Store shards are encoded in ``WRITERS`` background threads (Parquet encoding and
    compression release the GIL), so writing, the bulk of a conversion's work, runs on both
    cores while the main thread converts the next batch; at most ``WRITERS`` shards wait. An
    export file is written in order by one background thread (export, then encode), with at
    most one batch waiting for it.

    Resume (store outputs): each shard is written with a checkpoint, the conversion's state after
    the input batch that closed it, and the rows quarantined since the previous checkpoint go to
    a side file. A rerun with the same ``resume_key`` (input and options) finds the shards 0..k
    that all completed (``resumed``: shard k's checkpoint; ``resumed_shards`` = k + 1), forgets
    any later ones and goes on from there.
    """

    WRITERS = 2

    def __init__(self, out: Path, fmt: Format, kind: str, options: Options, provenance: dict, rows_per_shard: int,
                 resume_key: Callable[[], str], overwrite: bool = False):
        from alignflow.schemas.store import DatasetWriter, UnfinishedWriteOfAnotherKind

        self.fmt, self.kind, self.options = fmt, kind, options
        self.out = out
        self.rows_per_shard = rows_per_shard
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self._futures: list = []  # shards (or export batches) being written in the background, oldest first
        self._pool = None
        self._next_key = 0
        self._resume_key_of = resume_key  # computed when first needed (it waits for the input's sha256)
        self._resume_key: str | None = None
        self.resumed: dict | None = None
        self.resumed_shards = 0
        if fmt.name in CANONICAL and not _looks_like_file(out):
            try:
                self.store = DatasetWriter(out, kind, provenance, overwrite=overwrite)
            except UnfinishedWriteOfAnotherKind:  # not ours to go on from: start afresh
                self.store = DatasetWriter(out, kind, provenance, overwrite=overwrite, resume=False)
            self.file = None
            self.resume_dir = self.store.partial / RESUME_DIR
            self.resumed = self._find_checkpoint()
        else:
            if os.path.lexists(out) and (out.is_dir() or not overwrite):
                raise LabelsError(f"{out}: already exists; refusing to replace it"
                                  + ("" if out.is_dir() else " (pass --overwrite to replace the file)"))
            self.store = None
            self.file = FileWriter(out)

    @property
    def resume_key(self) -> str:
        if self._resume_key is None:
            self._resume_key = self._resume_key_of()
        return self._resume_key

    def _find_checkpoint(self) -> dict | None:
        """The checkpoint of shard k, where shards 0..k were all completed by a run with this
        resume key; later shards are forgotten (they will be written again)."""
        last = -1
        while (meta := self.store.shard_meta(last + 1)) is not None and meta.get("resume_key") == self.resume_key:
            last += 1
        later = [k for k in self.store.completed_shards() if not (k.isdigit() and int(k) <= last)]
        if later:
            self.store.forget_shards(later)
        for side in self.resume_dir.glob("quarantine-*.parquet"):  # those of shards to be written again
            if int(side.stem.split("-")[1]) > last:
                side.unlink()
        if last < 0:
            return None
        self._next_key = self.resumed_shards = last + 1
        return self.store.shard_meta(last)

    def _quarantine_file(self, key: int) -> Path:
        return self.resume_dir / f"quarantine-{key:05d}.parquet"

    def resumed_quarantine(self) -> list[pa.Table]:
        """Rows quarantined up to the checkpoint resumed from."""
        import pyarrow.parquet as pq

        files = [self._quarantine_file(k) for k in range(self.resumed_shards)]
        return [pq.read_table(f) for f in files if f.exists()]

    def write(self, table: pa.Table, checkpoint: Callable[[], tuple[dict, list[pa.Table]]] | None = None) -> None:
        """Add converted rows; ``checkpoint()`` gives the state after them (and the rows quarantined
        since the last call), asked for only when a shard is closed here."""
        if self.store is not None:
            self.pending.append(table)
            self.pending_rows += table.num_rows
            if self.pending_rows >= self.rows_per_shard:
                self._flush(checkpoint)
        elif table.num_rows:
            self._submit(self._export, table, in_flight=2)

    def _export(self, table: pa.Table) -> None:
        self.file.write(self.fmt.export(table, self.options.as_dict()))

    def _submit(self, fn, *args, in_flight: int) -> None:
        """Run ``fn(*args)`` in the writer pool once fewer than ``in_flight`` jobs are pending
        (an export file has one writer thread, so its batches are written in order)."""
        from concurrent.futures import ThreadPoolExecutor

        while len(self._futures) >= in_flight:
            self._futures.pop(0).result()
        if self._pool is None:
            workers = self.WRITERS if self.store is not None else 1
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="labels-writer")
        self._futures.append(self._pool.submit(fn, *args))

    def _flush(self, checkpoint=None) -> None:
        """Hand the pending rows to a writer thread, once fewer than WRITERS shards are in flight."""
        if not self.pending:
            return
        shard = pa.concat_tables(self.pending, promote_options="permissive")
        self.pending, self.pending_rows = [], 0
        meta = None
        if checkpoint is not None:
            import pyarrow.parquet as pq

            state, quarantined = checkpoint()
            if quarantined:  # most shards have none: no side file
                self.resume_dir.mkdir(exist_ok=True)
                pq.write_table(pa.concat_tables(quarantined), self._quarantine_file(self._next_key))
            meta = {"resume_key": self.resume_key, **state}
        self._submit(self.store.write_shard, shard, self._next_key, meta, in_flight=self.WRITERS)
        self._next_key += 1

    def _wait(self) -> None:
        """Wait for every shard in flight (all of them, even after one fails); raise the first error."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def close(self, extra: dict) -> Path:
        if self.store is not None:
            import shutil

            self._flush()
        self._wait()
        if self._pool is not None:
            self._pool.shutdown()
        if self.store is not None:
            shutil.rmtree(self.resume_dir, ignore_errors=True)
            return self.store.commit(extra)
        return self.file.close()

    def abort(self) -> None:
        """After an error: finish the shards in flight; keep the partial dataset when some shard is
        complete and resumable (a rerun goes on from it), else remove it."""
        if self._pool is not None:
            try:
                self._wait()
            except Exception:  # the error being handled is the one to report
                pass
            self._pool.shutdown()
        if self.store is not None:
            if not self.store.completed_shards():
                self.store.abort()
            self.store.release()
        else:
            self.file.abort()


def _looks_like_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(e) for e in (".jsonl", ".json", ".parquet", ".csv", ".gz"))


def convert_labels_file(
    source: str | os.PathLike,
    out: str | os.PathLike,
    from_format: str,
    to_format: str,
    options: Options | None = None,
    *,
    quarantine_path: str | os.PathLike | None = None,
    batch_rows: int = 16_384,
    rows_per_shard: int = 250_000,
    flow: str = "alignflow convert",
    progress: Callable[[Report, int | None], None] | None = None,
    overwrite: bool = False,
) -> Report:
    """Convert ``source`` (format ``from_format``) into ``out`` (format ``to_format``).

    ``out`` is a store dataset folder for the canonical kinds (pairwise, listwise, binary, sft)
    unless its name ends in a file extension; external formats are written as a file whose
    encoding is taken from the extension. Returns the ``Report`` (accounting adds up).
    ``progress(report, total_rows)`` is called after each batch (``total_rows``: the input's
    row count where the file says it, Parquet and dataset folders; else None).

    Nothing is destroyed unasked: ``out`` and ``quarantine_path`` must be new, empty, or (with
    ``overwrite``) a dataset of the same kind / an export file; neither may be or hold the input
    (``schemas.store.check_target`` / ``check_separate``).
    """
    from alignflow.schemas.store import QUARANTINE_KIND, check_separate, check_target, sha256_file

    options = options or Options()
    if options.ties not in TIES:
        raise LabelsError(f"unknown --ties {options.ties!r}; use drop or keep")
    if options.strategy not in cv.STRATEGIES:
        raise LabelsError(f"unknown --strategy {options.strategy!r}; known: {', '.join(cv.STRATEGIES)}")
    if options.multi_turn not in MULTI_TURN:
        raise LabelsError(f"unknown --multi-turn {options.multi_turn!r}; use {' or '.join(MULTI_TURN)}")
    if not options.max_field_mb > 0:
        raise LabelsError(f"--max-field-mb must be positive (got {options.max_field_mb})")
    fields = options.field_map()
    src_fmt, dst_fmt = get_format(from_format), get_format(to_format)
    if fields and not src_fmt.fields:
        raise LabelsError(f"--fields: format {src_fmt.name} takes none (formats with field options: "
                          f"{', '.join(n for n, f in _formats().items() if f.fields)})")
    kind_out = target_kind(dst_fmt)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise LabelsError(f"{source}: no such file")
    check_separate(out, [source])
    if quarantine_path is not None:
        check_separate(quarantine_path, [source, out], what="quarantine")
        check_target(quarantine_path, QUARANTINE_KIND, overwrite)  # before any work, not after it
    report = Report(src_fmt.name, dst_fmt.name)
    file_sha = _in_background(sha256_file, source) if source.is_file() else None  # hashlib releases the GIL
    provenance = {"flow": flow, "source_format": src_fmt.name, "source_file": str(source),
                  "source_sha256": None, "target_format": dst_fmt.name, "options": options.as_dict()}

    def with_sha() -> dict:
        if file_sha is not None and provenance["source_sha256"] is None:
            provenance["source_sha256"] = file_sha.result()
        return provenance
    if source.is_dir():
        from alignflow.schemas.store import read_manifest

        provenance["parent_datasets"] = [str(source)]
        provenance["source_manifest_kind"] = read_manifest(source)["kind"]
    # prompts keep one row per prompt across the whole input, as pairwise -> listwise groups do
    needs_whole = (not src_fmt.streaming or kind_out == "listwise" and src_fmt.kind == "pairwise"
                   or kind_out == "prompts")
    total_rows = known_rows(source) if progress is not None else None
    stats = cv.Stats()
    sink = _Sink(out, dst_fmt, kind_out, options, provenance, rows_per_shard,
                 resume_key=lambda: _resume_key(with_sha(), source, batch_rows, rows_per_shard), overwrite=overwrite)
    quarantine: list[pa.Table] = []
    duplicates = _Duplicates()
    # a threshold labels each response on its own: a prompt with one rated response still counts
    min_responses = 1 if kind_out == "binary" and options.threshold is not None else 2
    seen = None  # the last raw batch, for an error that says what the file holds
    offset, skip = 0, 0
    if sink.resumed is not None:  # an interrupted run's shards are kept: go on after them
        skip, offset = _restore(sink.resumed, report, stats)
        quarantine = sink.resumed_quarantine()
        report.info["resumed"] = {"shards": sink.resumed_shards, "records": report.read}
    saved = len(quarantine)

    def checkpoint(batches_done: int) -> tuple[dict, list[pa.Table]]:
        nonlocal saved
        new_rows, saved = quarantine[saved:], len(quarantine)
        return _state(report, stats, offset, batches_done), new_rows

    def parse(raws: Iterator[pa.Table]) -> Iterator[tuple[int, pa.Table, int, Parsed]]:
        """(batch index, raw batch, records, parsed rows) of every batch, those converted before an
        interruption included (their rows are fingerprinted again for the duplicate count)."""
        at = 0
        for index, raw in enumerate(raws):
            _check_field_sizes(raw, source, at, options.max_field_bytes)
            ctx = ReadContext(str(source), src_fmt.name, at, options.aspect, options.aggregate, fields,
                              options.multi_turn, min_responses)
            parsed = read_batch(src_fmt, raw, ctx)
            at += raw.num_rows
            yield index, raw, _records_read(raw, parsed), parsed

    def canonical(parsed: Parsed, report: Report, quarantine: list[pa.Table], stats: cv.Stats) -> tuple[pa.Table, str]:
        """A parsed batch as validated canonical rows, and their kind (ratings become listwise)."""
        if parsed.kind == "ratings":  # scores from the chosen aspects, before the listwise checks
            try:
                parsed.table, st = cv.ratings_to_listwise(parsed.table, options.aspect, src_fmt.default_aspect,
                                                          min_responses)
            except LabelsError as exc:  # an aspect the file does not have
                raise LabelsError(f"{source}: {exc}") from None
            stats.merge(st)
            report.dropped.update(st.dropped)
            report.info["aspect"] = f"aspects used: {st.extra.get('aspect')}"
        return _validated(parsed, report, quarantine, min_responses), "listwise" if parsed.kind == "ratings" else parsed.kind

    raws = source_batches(source, src_fmt, batch_rows, options.max_field_bytes)
    # streamed input is read and parsed in a background thread while this one converts
    batches = parse(_whole(raws)) if needs_whole else prefetch(parse(raws))
    try:
        for index, raw, records, parsed in batches:
            seen = raw
            if index < skip:  # converted before the interruption (its counts are restored): only
                # its canonical rows again, so that a later row repeating one of them still counts
                table, kind = canonical(parsed, Report(src_fmt.name, dst_fmt.name), [], cv.Stats())
                report.duplicates += duplicates.add(table, kind)
                continue
            offset += raw.num_rows
            report.read += records
            report.dropped.update(parsed.dropped)
            report.info.update({k: v for k, v in parsed.info.items() if v is not None})
            table, kind = canonical(parsed, report, quarantine, stats)
            report.duplicates += duplicates.add(table, kind)
            canon_ids = pa.array(np.arange(table.num_rows, dtype=np.int64))
            table = table.append_column("_cid", canon_ids)
            canon_nrec = table.column("_nrec").to_numpy()
            converted, st = convert_kind(table, kind, kind_out, options, source=src_fmt.source)
            stats.merge(st)
            if st.contributed is not None:
                produced = pc.is_in(canon_ids, value_set=pa.array(st.contributed)).to_numpy(zero_copy_only=False)
            elif converted.num_rows:
                produced = pc.is_in(canon_ids, value_set=pc.unique(converted.column("_cid"))).to_numpy(zero_copy_only=False)
            else:
                produced = np.zeros(len(canon_ids), dtype=bool)
            written = int(canon_nrec[produced].sum())
            report.written += written
            unexplained = int(canon_nrec.sum()) - written - int(sum(st.dropped.values()))
            report.dropped.update(st.dropped)
            if unexplained:
                report.dropped["no output row"] += unexplained
            report.rows_out += converted.num_rows
            sink.write(_strip(converted), lambda done=index + 1: checkpoint(done))
            if progress is not None:
                progress(report, total_rows)
        report.tie_pairs, report.identical_pairs = stats.tie_pairs, stats.identical_pairs
        for key in ("intransitive_prompts", "copeland_disagreements", "unrated_responses", "responses_left_out"):
            if key in stats.extra:
                report.info[key] = stats.extra[key]
        report.dropped = +report.dropped
        extra = {"accounting": report.as_dict(),
                 **{k: v for k, v in report.info.items() if k in ("agreement", "aspect", "copeland_disagreements")}}
        if "intransitive_prompts" in report.info:
            extra["intransitive_prompts"] = report.info["intransitive_prompts"][:1000]
        if report.rows_out == 0:  # a run that writes nothing is an error, never a success
            if quarantine_path is not None:
                _write_quarantine(quarantine_path, quarantine, with_sha(), flow, report, overwrite)
            raise LabelsError(_nothing_written(source, src_fmt, kind_out, report, seen))
        sha = {"source_sha256": with_sha()["source_sha256"]}  # the store's copy of provenance was taken before
        report.output = str(sink.close({**sha, **extra}))
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if sink.file is not None:
        import json

        side = out.with_name(out.name + ".manifest.json")
        side.write_text(json.dumps({"provenance": provenance, **extra}, indent=2, default=str))
    if quarantine_path is not None:
        _write_quarantine(quarantine_path, quarantine, with_sha(), flow, report, overwrite)
    if not report.adds_up:  # a bug, never bad input: say so loudly
        raise AssertionError(f"accounting does not add up: {report.line()}")
    return report


def _write_quarantine(path, quarantine: list[pa.Table], provenance: dict, flow: str, report: Report,
                      overwrite: bool) -> None:
    from alignflow.schemas.store import QUARANTINE_KIND, write_dataset

    qt = pa.concat_tables(quarantine) if quarantine else QUARANTINE_SCHEMA.empty_table()
    write_dataset(path, qt, QUARANTINE_KIND, {**provenance, "flow": flow, "what": "rows refused by the conversion"},
                  overwrite=overwrite)
    report.quarantine_path = str(path)


def _nothing_written(source: Path, fmt: Format, kind_out: str, report: Report, raw: pa.Table | None) -> str:
    """Why a conversion produced no row, what the file holds, and the format its shape suggests."""
    from alignflow.feedback.labels.shapes import columns_seen, hint

    if report.read == 0:
        why = "the file holds no records"
    else:
        reasons = [f"{n} {r}" for r, n in (report.quarantine_reasons + report.dropped).most_common(3)]
        why = f"all {report.read} records were refused (" + "; ".join(reasons) + ")" if reasons else \
            f"none of {report.read} records gave a {kind_out} row"
    return (f"{source}: nothing written as {fmt.name} -> {kind_out}: {why}; columns seen: {columns_seen(raw)}"
            f"{hint(raw, fmt.name)}")


def _check_field_sizes(raw: pa.Table, source: Path, offset: int, limit: int) -> None:
    bad, fields = oversized_rows(raw, limit)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LabelsError(f"{source}: row {offset + row}: field {fields[row]!r}: a value over {mib(limit)} "
                          f"(the limit per field; raise it with --max-field-mb)")


# what makes two canonical rows the same (extras such as per-response labels are not compared)
DUPLICATE_KEYS = {"pairwise": ("prompt_id", "chosen", "rejected", "margin"), "listwise": ("prompt_id", "responses", "scores"),
                  "binary": ("prompt_id", "response", "label"), "sft": ("prompt_id", "response")}
EDGE = 32  # bytes of each text's beginning and end in its fingerprint


def _key_bytes(values: pa.Array, edges: bool) -> pa.Array:
    """Each value as bytes for the duplicate key (null -> ``\\x00``). With ``edges`` a text is
    its byte length and its first and last ``EDGE`` bytes: byte slices cost O(1) a text, where a
    character slice from the end walks the whole text."""
    if not (edges and is_text_type(values.type)):
        return pc.fill_null(values.cast(pa.string()), "\x00").cast(pa.binary())
    texts = pc.fill_null(values.cast(pa.binary()), b"\x00")
    return pc.binary_join_element_wise(pc.binary_length(texts).cast(pa.string()).cast(pa.binary()),
                                       pc.binary_slice(texts, 0, EDGE), pc.binary_slice(texts, -EDGE), b"\x1f")


class _Duplicates:
    """Counts canonical rows that repeat an earlier row of the run: same prompt and labels, and
    responses of the same byte length with the same first and last ``EDGE`` bytes (a list of
    responses: each item so).

    A 64-bit hash of that fingerprint is kept per distinct row (8 bytes a row: sorted arrays
    merged like a binary counter, O(n log n) for the run). Hashing whole texts would cost as
    much as reading them again; two rows that differ only inside a long response are the one
    case counted wrongly. Python's bytes hash is salted per process, which is all a count within
    one run needs.
    """

    def __init__(self):
        self.levels: list[np.ndarray] = []  # sorted unique hashes, sizes roughly halving

    def add(self, table: pa.Table, kind: str) -> int:
        if table.num_rows == 0 or kind not in DUPLICATE_KEYS:
            return 0
        parts = []
        for name in DUPLICATE_KEYS[kind]:
            c = table.column(name).combine_chunks()
            if pa.types.is_list(c.type):  # each item keyed on its own, the items joined
                lengths = pc.list_value_length(c).fill_null(0).to_numpy(zero_copy_only=False)
                offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
                c = pc.binary_join(pa.ListArray.from_arrays(offsets, _key_bytes(pc.list_flatten(c), True)), b"\x1e")
            else:  # long texts by their length and edges; the prompt id whole
                c = _key_bytes(c, edges=name != "prompt_id")
            parts.append(c)
        key = pc.binary_join_element_wise(*parts, b"\x1d")
        # one C-level hash call per key: pyarrow has no row-hash kernel, and the numpy SipHash of
        # schemas/siphash.py is about 15x slower on keys this long (840k Nectar pairs: 0.9 s vs 0.06 s)
        h = np.fromiter(map(hash, key.to_numpy(zero_copy_only=False)), dtype=np.int64, count=len(key))
        unique = np.unique(h)
        seen = np.zeros(len(unique), dtype=bool)
        for level in self.levels:
            at = np.minimum(np.searchsorted(level, unique), len(level) - 1)
            seen |= level[at] == unique
        if (~seen).any():
            self.levels.append(unique[~seen])
        while len(self.levels) > 1 and len(self.levels[-1]) >= len(self.levels[-2]):
            top = self.levels.pop()
            self.levels[-1] = np.union1d(self.levels[-1], top)
        return int(len(h) - (~seen).sum())


def _in_background(fn, *args):
    """``fn(*args)`` started in a daemon thread; ``.result()`` waits for it (and raises its error)."""
    import threading
    from concurrent.futures import Future

    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # raised by .result()
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="labels-sha256").start()
    return future


RESUME_VERSION = 1  # bump when what a checkpoint holds, or how batches map to shards, changes


def _resume_key(provenance: dict, source: Path, batch_rows: int, rows_per_shard: int) -> str:
    """What must match for a rerun to go on from an interrupted run's shards: the input (its
    sha256, or a dataset folder's manifest), formats, options and the batch and shard sizes."""
    import hashlib
    import json

    from alignflow.schemas.store import manifest_file, sha256_file

    ident = {k: v for k, v in provenance.items() if k != "flow"}
    if source.is_dir():
        ident["source_manifest_sha256"] = sha256_file(manifest_file(source))
    ident.update(batch_rows=batch_rows, rows_per_shard=rows_per_shard, resume_version=RESUME_VERSION)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _state(report: Report, stats: cv.Stats, offset: int, batches_done: int) -> dict:
    """The conversion's state after ``batches_done`` input batches (JSON, for a checkpoint)."""
    return {"batches_done": batches_done, "offset": offset,
            "report": {"read": report.read, "written": report.written, "quarantined": report.quarantined,
                       "dropped": dict(report.dropped), "quarantine_reasons": dict(report.quarantine_reasons),
                       "rows_out": report.rows_out, "info": report.info},
            "stats": {"tie_pairs": stats.tie_pairs, "identical_pairs": stats.identical_pairs,
                      "dropped": dict(stats.dropped), "extra": stats.extra}}


def _restore(state: dict, report: Report, stats: cv.Stats) -> tuple[int, int]:
    """Load a checkpoint into ``report`` and ``stats``; returns (batches done, rows read)."""
    r, st = state["report"], state["stats"]
    report.read, report.written, report.quarantined, report.rows_out = r["read"], r["written"], r["quarantined"], r["rows_out"]
    report.dropped, report.quarantine_reasons = Counter(r["dropped"]), Counter(r["quarantine_reasons"])
    report.info.update(r["info"])
    stats.tie_pairs, stats.identical_pairs = st["tie_pairs"], st["identical_pairs"]
    stats.dropped, stats.extra = Counter(st["dropped"]), dict(st["extra"])
    return state["batches_done"], state["offset"]


def _records_read(raw: pa.Table, parsed: Parsed) -> int:
    """Records of a raw batch: its rows, or what the reader counted (the oasst nested exports:
    records = messages)."""
    records = parsed.info.pop("records", None)
    return raw.num_rows if records is None else int(records)
