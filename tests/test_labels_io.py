"""Streaming reads of label files: ``.json`` arrays and ``.xlsx`` sheets come in batches of
``batch_rows`` with bounded memory, give the same rows as one whole read, and bad input
gives one line naming file, row (and line)."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from alignflow.feedback.labels import LabelsError, Options, convert_labels_file
from alignflow.feedback.labels import io as lio


def _rows(n):
    # mixed types across the file: an int column that turns float, a field only some rows have
    return [{"instruction": f"q{i}", "output_1": f"a{i}" * (i % 7 + 1), "output_2": f"b{i}",
             "preference": 1 if i % 3 else 2.0, **({"note": "x"} if i % 50 == 0 else {})} for i in range(n)]


def _all(batches):
    return [r for b in batches for r in b.to_pylist()]


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_array_streams_in_batches_like_a_whole_read(tmp_path, monkeypatch, wrapped):
    rows = _rows(1000)
    doc = {"meta": {"source": "x", "tags": {"a": 1}}, "data": rows, "count": 1000} if wrapped else rows
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc, indent=1))
    whole = lio.read_file(path)  # default batch_rows: one batch
    monkeypatch.setattr(lio, "JSON_CHUNK_CHARS", 97)  # rows straddle the window's end everywhere
    batches = list(lio.iter_file_batches(path, batch_rows=64))
    assert [b.num_rows for b in batches] == [64] * 15 + [40]
    assert lio.concat_loose(batches).to_pylist() == whole.to_pylist()
    assert [{k: v for k, v in r.items() if v is not None} for r in _all(batches)] == rows


def test_json_array_memory_is_bounded_by_the_batch_not_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(lio, "JSON_CHUNK_CHARS", 1 << 15)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_rows(20_000)))  # ~2 MB of text
    size = path.stat().st_size
    (tmp_path / "warm.json").write_text(json.dumps(_rows(3)))
    list(lio.iter_file_batches(tmp_path / "warm.json"))  # first-use imports are not the reader's memory
    gen = lio.iter_file_batches(path, batch_rows=500)
    tracemalloc.start()
    try:
        first = next(gen)  # only the first window and batch are read
        _, peak_first = tracemalloc.get_traced_memory()
        sizes = [first.num_rows] + [b.num_rows for b in gen]
        _, peak_all = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tracemalloc.start()
    try:
        json.loads(path.read_text())  # what a whole read holds: every row as Python objects
        _, peak_whole = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [500] * 40
    assert peak_all < size // 2 and peak_all < peak_whole // 10, (peak_first, peak_all, peak_whole, size)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_json_errors_name_file_row_and_line(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(lio, "JSON_CHUNK_CHARS", chunk)
    cases = {'[{"a": 1},\n{"a": 2}\n{"a": 3}]': r"e.json: row 1: line 3 is not JSON \(expected ',' or ']', got '\{'\)",
             '[{"a": 1},\n{"a": tru}]': r"e.json: row 1: line 2 is not JSON",
             '[{"a": 1},\n{"a": 2},': r"e.json: row 2: line 2 is not JSON",
             '[{"a": 1}, 7]': r"e.json: row 1: expected a JSON object, got int",
             '[\n{"a": 1},\n\n  {"a": "x\n  }]': r"e.json: row 1: line 4 is not JSON \(Invalid control character",
             '{"meta": 1,\n "data": [{"a": 1}\n  "x"]}': r"e.json: row 0: line 3 is not JSON \(expected ',' or ']', got '\"'\)",
             '{"meta": 1,\n "data" [{"a": 1}]}': r"e.json: row 0: field 'data': line 2 is not JSON \(expected ':'",
             '{"a": [{"x": 1}], "b": [2]}': r"e.json: row 0: expected a JSON array of objects",
             '"text"': r"e.json: row 0: expected a JSON array",
             '[{"a": 1}] tail': r"e.json: line 1: unreadable as json \(extra data"}
    for text, message in cases.items():
        (tmp_path / "e.json").write_text(text)
        with pytest.raises(LabelsError, match=message):
            list(lio.iter_file_batches(tmp_path / "e.json", batch_rows=1))
    (tmp_path / "empty.json").write_text(" [ ] ")
    assert [b.num_rows for b in lio.iter_file_batches(tmp_path / "empty.json")] == [0]


def test_json_long_row_and_numbers_cut_at_the_window_end(tmp_path, monkeypatch):
    monkeypatch.setattr(lio, "JSON_CHUNK_CHARS", 8)
    rows = [{"t": "y" * 5000, "n": 1234567890123}, {"t": "é\n\"", "n": -1.5e-7}, {"t": "z", "n": 12345678901}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    assert _all(lio.iter_file_batches(tmp_path / "l.json", batch_rows=2)) == rows


def _xlsx(path, header, rows):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(header)
    for r in rows:
        book.active.append(r)
    book.save(path)
    return path


def test_xlsx_streams_in_batches_like_a_whole_read(tmp_path):
    rows = [[f"p{i // 3}", "m1", "m2", f"a{i}", f"b{i}", ["a-is-better", "tie", "b-is-slightly-better"][i % 3],
             f"e{i % 4}", i if i % 5 else f"n{i}"] for i in range(250)]
    rows[17] = [None] * 8  # a blank row is kept
    path = _xlsx(tmp_path / "s.xlsx", ["prompt", "model_a", "model_b", "completion_a", "completion_b", "preference",
                                       "evaluator", "mixed"], rows)
    whole = lio.read_file(path)
    batches = list(lio.iter_file_batches(path, batch_rows=40))
    assert [b.num_rows for b in batches] == [40] * 6 + [10]
    assert lio.concat_loose(batches).to_pylist() == whole.to_pylist()
    assert whole.num_rows == 250 and whole.column("prompt")[17].as_py() is None
    assert whole.column("mixed").to_pylist()[:6] == ["n0", "1", "2", "3", "4", "n5"]  # one type: text
    # a grouping format reads the batches as one table: the same report and rows either way
    small = convert_labels_file(path, tmp_path / "o1", "graded-pairwise", "pairwise", batch_rows=40)
    big = convert_labels_file(path, tmp_path / "o2", "graded-pairwise", "pairwise")
    assert small.as_dict() == big.as_dict() and small.read == 250


def test_alpaca_eval_json_in_many_batches_converts_the_same(tmp_path):
    rows = [{"instruction": f"q{i}", "output_1": f"a{i}", "output_2": f"b{i}", "preference": [1, 2, 0, 1.5][i % 4]}
            for i in range(300)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    small = convert_labels_file(tmp_path / "a.json", tmp_path / "s.jsonl", "alpaca-eval", "trl-preference",
                                Options(ties="drop"), batch_rows=7)
    big = convert_labels_file(tmp_path / "a.json", tmp_path / "b.jsonl", "alpaca-eval", "trl-preference",
                              Options(ties="drop"))
    assert small.as_dict() == big.as_dict() and small.written == 150
    assert (tmp_path / "s.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def _listwise_file(tmp_path, n=400):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
             "responses": [f"r{i}-{j}" for j in range(2 + i % 4)], "scores": [float((j * 7 + i) % 5) for j in range(2 + i % 4)]}
            for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lw.parquet")
    return tmp_path / "lw.parquet"


def test_many_shards_written_in_parallel_keep_the_order_of_one(tmp_path):
    from alignflow.schemas.store import read_dataset, read_manifest

    src = _listwise_file(tmp_path)
    one = convert_labels_file(src, tmp_path / "one", "listwise", "pairwise")
    many = convert_labels_file(src, tmp_path / "many", "listwise", "pairwise", batch_rows=16, rows_per_shard=25)
    assert one.as_dict() == many.as_dict()
    assert len(read_manifest(tmp_path / "many")["shards"]) > 10
    assert read_dataset(tmp_path / "many").to_pylist() == read_dataset(tmp_path / "one").to_pylist()


def _fail_shard(monkeypatch, failing_key: int):
    """Make the store's shard ``failing_key`` fail to write (disk full); returns the real writer."""
    from alignflow.schemas.store import DatasetWriter

    real = DatasetWriter.write_shard

    def write_shard(self, table, key=None, meta=None):
        if key == failing_key:
            raise OSError("disk full")
        return real(self, table, key, meta)

    monkeypatch.setattr(DatasetWriter, "write_shard", write_shard)
    return real


def test_a_run_that_fails_mid_write_is_resumed_from_its_finished_shards(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignflow.schemas.store import DatasetWriter, read_dataset, read_manifest

    src = _listwise_file(tmp_path)
    table = pq.read_table(src)  # two rows the conversion refuses: they must survive the interruption too
    responses = table.column("responses").to_pylist()
    responses[5] = responses[250] = ["only one"]
    pq.write_table(table.set_column(2, "responses", pa.array(responses)), src)
    kw = dict(batch_rows=16, rows_per_shard=25)
    reference = convert_labels_file(src, tmp_path / "ref", "listwise", "pairwise", quarantine_path=tmp_path / "ref-q", **kw)

    real = _fail_shard(monkeypatch, 6)
    with pytest.raises(OSError, match="disk full"):
        convert_labels_file(src, tmp_path / "out", "listwise", "pairwise", quarantine_path=tmp_path / "q", **kw)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and partial.is_dir()
    kept = {p.name: p.stat().st_mtime_ns for p in partial.glob("train-0000[0-5].parquet")}
    assert len(kept) == 6

    monkeypatch.setattr(DatasetWriter, "write_shard", real)
    again = convert_labels_file(src, tmp_path / "out", "listwise", "pairwise", quarantine_path=tmp_path / "q", **kw)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("train-0000[0-5].parquet")} == kept
    assert again.as_dict() == reference.as_dict() and again.quarantined == 2 and again.adds_up
    assert again.info["resumed"] == {"shards": 6, "records": again.info["resumed"]["records"]}
    assert any("resumed an interrupted run: its first 6 shards" in line for line in again.details())
    assert read_dataset(tmp_path / "out").equals(read_dataset(tmp_path / "ref"))
    assert read_dataset(tmp_path / "q").equals(read_dataset(tmp_path / "ref-q"))
    assert [s["sha256"] for s in read_manifest(tmp_path / "out")["shards"]] == \
        [s["sha256"] for s in read_manifest(tmp_path / "ref")["shards"]]
    assert not (tmp_path / "out.partial").exists() and not list((tmp_path / "out").glob(".resume*"))


def test_a_resumed_run_counts_the_duplicates_of_rows_converted_before_the_interruption(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignflow.schemas.store import DatasetWriter

    src = _listwise_file(tmp_path, n=200)
    table = pq.read_table(src)
    pq.write_table(pa.concat_tables([table, table.slice(0, 100)]), src)  # rows 200-299 repeat rows 0-99
    kw = dict(batch_rows=16, rows_per_shard=25)
    reference = convert_labels_file(src, tmp_path / "ref", "listwise", "pairwise", **kw)
    assert reference.duplicates == 100

    real = _fail_shard(monkeypatch, 6)  # shards 0-5 (rows before ~100) are kept
    with pytest.raises(OSError, match="disk full"):
        convert_labels_file(src, tmp_path / "out", "listwise", "pairwise", **kw)
    monkeypatch.setattr(DatasetWriter, "write_shard", real)
    again = convert_labels_file(src, tmp_path / "out", "listwise", "pairwise", **kw)
    assert again.info["resumed"]["shards"] == 6
    assert again.duplicates == reference.duplicates and again.as_dict() == reference.as_dict()


def test_a_partial_run_of_other_input_or_options_is_not_resumed(tmp_path, monkeypatch):
    from alignflow.schemas.store import DatasetWriter, read_dataset

    src = _listwise_file(tmp_path)
    real = _fail_shard(monkeypatch, 3)
    with pytest.raises(OSError):
        convert_labels_file(src, tmp_path / "out", "listwise", "pairwise", batch_rows=16, rows_per_shard=25)
    monkeypatch.setattr(DatasetWriter, "write_shard", real)
    other = convert_labels_file(src, tmp_path / "out", "listwise", "pairwise", Options(strategy="best-vs-worst"),
                                batch_rows=16, rows_per_shard=25)
    assert "resumed" not in other.info and other.rows_out == read_dataset(tmp_path / "out").num_rows
    convert_labels_file(src, tmp_path / "fresh", "listwise", "pairwise", Options(strategy="best-vs-worst"))
    assert read_dataset(tmp_path / "out").equals(read_dataset(tmp_path / "fresh"))


def test_a_failure_before_any_shard_leaves_nothing(tmp_path, monkeypatch):
    from alignflow.schemas.store import DatasetWriter

    def failing(self, table, key=None, meta=None):
        raise OSError("disk full")

    monkeypatch.setattr(DatasetWriter, "write_shard", failing)
    with pytest.raises(OSError):
        convert_labels_file(_listwise_file(tmp_path), tmp_path / "out", "listwise", "pairwise", batch_rows=16,
                            rows_per_shard=25)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_progress_is_reported_per_batch_with_the_known_total(tmp_path):
    seen = []
    report = convert_labels_file(_listwise_file(tmp_path), tmp_path / "out", "listwise", "pairwise", batch_rows=64,
                                 progress=lambda r, total: seen.append((r.read, r.rows_out, total)))
    assert [s[0] for s in seen] == [64, 128, 192, 256, 320, 384, 400] and {s[2] for s in seen} == {400}
    assert seen[-1][:2] == (report.read, report.rows_out)
