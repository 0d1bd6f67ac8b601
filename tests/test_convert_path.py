"""The ``alignflow convert`` path as a whole process: what it imports, export batches written by
the background writer (in order, errors surfaced, nothing left behind), columns used uncopied."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.feedback.labels import LabelsError, Options, convert_labels_file
from alignflow.feedback.labels.columns import col


def _nectar(path, rows: int, turns: int = 1):
    history = "".join(f"\n\nHuman: earlier {t}\n\nAssistant: reply {t}" for t in range(turns - 1))
    with open(path, "w") as fh:
        for i in range(rows):
            answers = [{"answer": f"answer {i}.{k}", "model": f"m{k}", "rank": k + 1} for k in range(7)]
            fh.write(json.dumps({"prompt": f"{history}\n\nHuman: question {i}?\n\nAssistant: ", "answers": answers}) + "\n")
    return path


def test_convert_command_imports_no_training_or_flow_stack(tmp_path):
    src, out = _nectar(tmp_path / "n.jsonl", 20), tmp_path / "pairs.parquet"
    argv = ["alignflow", "convert", str(src), str(out), "--from", "nectar", "--to", "trl-preference"]
    code = ("import json, runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('alignflow.flows.cli', run_name='__main__')\n"
            "except SystemExit as exc:\n    rc = exc.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'prefect', 'datasets', 'matplotlib') if m in sys.modules]\n"
            "print(json.dumps({'rc': rc, 'heavy': heavy}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}, proc.stdout + proc.stderr
    assert pq.read_metadata(out).num_rows == 20 * 21


def test_export_batches_are_written_in_input_order(tmp_path):
    src = _nectar(tmp_path / "n.jsonl", 40)
    convert_labels_file(src, tmp_path / "many.parquet", "nectar", "trl-preference", batch_rows=3)  # 14 batches
    convert_labels_file(src, tmp_path / "one.parquet", "nectar", "trl-preference", batch_rows=10_000)
    many, one = pq.read_table(tmp_path / "many.parquet"), pq.read_table(tmp_path / "one.parquet")
    assert many.equals(one) and many.num_rows == 40 * 21
    assert many.column("prompt").to_pylist()[::21] == [f"question {i}?" for i in range(40)]
    assert many.column("chosen")[0].as_py() == "answer 0.0" and many.column("margin")[0].as_py() == 1.0


def test_an_export_that_fails_in_the_writer_is_the_error_and_leaves_no_file(tmp_path):
    src = _nectar(tmp_path / "n.jsonl", 30, turns=2)  # multi-turn prompts: no standard style
    out = tmp_path / "pairs.parquet"
    with pytest.raises(LabelsError, match="trl standard style needs single-turn prompts"):
        convert_labels_file(src, out, "nectar", "trl-preference", Options(style="standard"), batch_rows=4)
    assert list(tmp_path.iterdir()) == [src]


def test_single_chunk_columns_are_used_without_a_copy():
    table = pa.table({"text": pa.array(["x" * 100] * 1000)})
    assert col(table, "text").buffers()[2].address == table.column("text").chunk(0).buffers()[2].address
    two = pa.table({"text": pa.chunked_array([["a"], ["b"]])})
    assert col(two, "text").to_pylist() == ["a", "b"]
