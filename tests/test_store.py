"""The dataset store: round trips, atomic writes, resume, checksums, CLI inspect/validate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from alignflow.schemas import DatasetError, DatasetWriter, read_dataset, read_manifest, validate, write_dataset
from alignflow.schemas.store import MANIFEST, iter_batches, verify_dataset
from tests.test_schemas import GOOD_ROWS


@pytest.mark.parametrize("kind", list(GOOD_ROWS))
def test_round_trip_through_pyarrow_and_datasets(tmp_path, kind):
    import datasets

    table = validate(pa.Table.from_pylist([GOOD_ROWS[kind]] * 5), kind).valid
    path = write_dataset(tmp_path / kind, table, kind, {"flow": "test", "seed": 3}, rows_per_shard=2)
    manifest = read_manifest(path)
    assert manifest["kind"] == kind and manifest["num_rows"] == 5 and len(manifest["shards"]) == 3
    assert manifest["provenance"] == {"flow": "test", "seed": 3}
    assert read_dataset(path).equals(table)
    assert pads.dataset(path, format="parquet", exclude_invalid_files=True).to_table().num_rows == 5
    hf = datasets.load_dataset("parquet", data_dir=str(path), split="train")
    assert hf.num_rows == 5
    assert hf[0]["prompt"] == [{"role": "user", "content": "Reverse: abc"}]
    assert sum(b.num_rows for b in iter_batches(path, batch_size=2)) == 5


def test_secrets_never_reach_the_manifest(tmp_path):
    table = pa.Table.from_pylist([GOOD_ROWS["sft"]])
    path = write_dataset(tmp_path / "d", table, "sft", {"backend": {"api_key": "sk-123", "url": "http://x"}})
    text = (path / MANIFEST).read_text()
    assert "sk-123" not in text and "http://x" in text


def test_secrets_are_scrubbed_but_token_counts_and_tokenizers_kept():
    from alignflow.schemas.store import scrub_secrets

    generation = {"max_new_tokens": 64, "tokenizer": "/ckpt", "hf_token": "hf_abc", "access_token": "t",
                  "headers": {"Authorization": "Bearer x"}, "max_batch_tokens": 16384, "api_key": ""}
    assert scrub_secrets({"generation": generation}) == {"generation": {
        "max_new_tokens": 64, "tokenizer": "/ckpt", "hf_token": "***", "access_token": "***",
        "headers": {"Authorization": "***"}, "max_batch_tokens": 16384, "api_key": ""}}


def test_existing_dataset_is_not_overwritten_unless_asked(tmp_path):
    table = pa.Table.from_pylist([GOOD_ROWS["sft"]])
    write_dataset(tmp_path / "d", table, "sft")
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(tmp_path / "d", table, "sft")
    write_dataset(tmp_path / "d", pa.concat_tables([validate(table, "sft").valid] * 2), "sft", overwrite=True)
    assert read_manifest(tmp_path / "d")["num_rows"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folders left behind


def test_wrong_columns_are_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="missing column"):
        write_dataset(tmp_path / "d", pa.table({"prompt": ["p"]}), "sft")


def test_tampered_shard_missing_manifest_and_bad_manifest_are_detected(tmp_path):
    table = pa.Table.from_pylist([GOOD_ROWS["pairwise"]] * 4)
    path = write_dataset(tmp_path / "d", table, "pairwise", rows_per_shard=2)
    shard = path / read_manifest(path)["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        read_dataset(path)
    shard.unlink()
    with pytest.raises(DatasetError, match="missing"):
        verify_dataset(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        read_dataset(path)
    (path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match="not an alignflow manifest"):
        read_dataset(path)
    (path / MANIFEST).unlink()
    with pytest.raises(DatasetError, match="no _manifest.json"):
        read_dataset(path)
    with pytest.raises(DatasetError, match="no such dataset"):
        read_dataset(tmp_path / "nowhere")


def test_streaming_writer_resumes_from_completed_shards(tmp_path):
    rows = pa.Table.from_pylist([GOOD_ROWS["binary"]] * 3)
    target = tmp_path / "stream"
    writer = DatasetWriter(target, "binary", {"flow": "gen"})
    writer.write_shard(rows, 0)
    writer.write_shard(rows, 1)
    del writer  # the producer dies before commit: nothing visible
    assert not target.exists()
    with pytest.raises(DatasetError):
        read_dataset(target)

    resumed = DatasetWriter(target, "binary", {"flow": "gen"})
    assert resumed.completed_shards() == {"00000", "00001"}
    written = []
    for i in range(4):
        if resumed.has_shard(i):
            continue
        resumed.write_shard(rows, i)
        written.append(i)
    assert written == [2, 3]
    resumed.commit()
    assert read_manifest(target)["num_rows"] == 12
    assert not target.with_name("stream.partial").exists()


def test_write_killed_half_way_leaves_no_visible_dataset(tmp_path):
    """SIGKILL a process in the middle of a multi-shard write: no dataset appears."""
    target = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, pyarrow as pa
        from alignflow.schemas.store import DatasetWriter
        w = DatasetWriter({str(target)!r}, "sft")
        t = pa.table({{"prompt": ["p"] * 1000, "response": ["r"] * 1000}})
        for i in range(5):
            w.write_shard(t, i)
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        w.commit()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    partial = target.with_name("killed.partial")
    assert partial.exists() and not (partial / MANIFEST).exists()
    assert DatasetWriter(target, "sft").completed_shards() == {"00000", "00001", "00002"}


def test_cli_inspect_and_validate(tmp_path):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    table = pa.Table.from_pylist([GOOD_ROWS["pairwise"]] * 3)
    path = write_dataset(tmp_path / "d", table, "pairwise", {"flow": "test"})
    runner = CliRunner()
    out = runner.invoke(app, ["inspect", str(path)])
    assert out.exit_code == 0, out.output
    assert "pairwise" in out.output and "rows=3" in out.output and "Reverse: abc" in out.output
    out = runner.invoke(app, ["validate", str(path)])
    assert out.exit_code == 0 and "3 valid, 0 quarantined" in out.output

    # rows that break the kind's rules (written around the store's checks) fail validation
    bad = read_dataset(path).set_column(3, "rejected", pa.array(["cba"] * 3))
    os.remove(path / "train-00000.parquet")
    import pyarrow.parquet as pq

    pq.write_table(bad, path / "train-00000.parquet")
    out = runner.invoke(app, ["validate", str(path)])
    assert out.exit_code == 2 and "checksum mismatch" in out.output
    from alignflow.schemas.store import sha256_file

    manifest = json.loads((path / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = sha256_file(path / "train-00000.parquet")
    (path / MANIFEST).write_text(json.dumps(manifest))
    out = runner.invoke(app, ["validate", str(path), "--quarantine", str(tmp_path / "q")])
    assert out.exit_code == 1
    assert "row 0: chosen == rejected" in out.output
    assert read_manifest(tmp_path / "q")["num_rows"] == 3

    out = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "no such dataset folder" in out.output
    assert "Traceback" not in out.output


def test_cli_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.time(); import flows.cli; "
            "heavy=[m for m in ('torch','transformers','datasets','prefect') if m in sys.modules]; "
            "print(heavy, time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, seconds = out.stdout.rsplit("]", 1)
    assert heavy + "]" == "[]", out.stdout
    assert float(seconds) < 2.0


def test_shards_written_from_several_threads_are_all_recorded(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rows = pa.Table.from_pylist([GOOD_ROWS["binary"]] * 3)
    writer = DatasetWriter(tmp_path / "par", "binary", {"flow": "gen"})
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: writer.write_shard(rows, i), range(12)))
    progress = json.loads((tmp_path / "par.partial" / "progress.json").read_text())
    assert [s["key"] for s in progress["shards"]] == [f"{i:05d}" for i in range(12)]
    writer.commit()
    assert read_manifest(tmp_path / "par")["num_rows"] == 36 and verify_dataset(tmp_path / "par")


def test_statistics_only_on_scalar_columns(tmp_path):
    import pyarrow.parquet as pq

    table = validate(pa.Table.from_pylist([GOOD_ROWS["pairwise"], {**GOOD_ROWS["pairwise"], "margin": 2.5}]),
                     "pairwise").valid
    path = write_dataset(tmp_path / "p", table, "pairwise")
    meta = pq.ParquetFile(path / read_manifest(path)["shards"][0]["file"]).metadata.row_group(0)
    with_stats = {meta.column(i).path_in_schema for i in range(meta.num_columns) if meta.column(i).is_stats_set}
    assert "margin" in with_stats and not with_stats & {"chosen", "rejected", "prompt_id"}
    assert read_dataset(path).equals(table)
