"""flows/step_records.py: which inputs made a step's output (the flows' test is
tests/test_flows.py::test_a_rerun_with_a_changed_input_makes_that_step_and_the_later_ones_again)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from alignflow.flows.step_records import StepRecords, step_inputs
from alignflow.schemas.store import write_dataset


def test_the_key_follows_a_dataset_rewritten_at_the_same_path(tmp_path):
    data = tmp_path / "prompts"
    write_dataset(data, pa.table({"prompt": ["a", "b"]}), "prompts")
    key, inputs = step_inputs({"out": str(tmp_path / "x"), "prompts": str(data), "k": 2})
    assert step_inputs({"out": str(tmp_path / "elsewhere"), "prompts": str(data), "k": 2})[0] == key  # out left out
    assert inputs["prompts"]["path"] == str(data) and len(inputs["prompts"]["content"]) == 64
    write_dataset(data, pa.table({"prompt": ["a", "c"]}), "prompts", overwrite=True)
    assert step_inputs({"out": str(tmp_path / "x"), "prompts": str(data), "k": 2})[0] != key
    assert step_inputs({"out": str(tmp_path / "x"), "prompts": str(data), "k": 3})[0] != \
        step_inputs({"out": str(tmp_path / "x"), "prompts": str(data), "k": 2})[0]


def test_records_hold_no_secret_and_a_new_key_value_changes_nothing(tmp_path):
    records = StepRecords(tmp_path)
    judge = {"type": "openai", "api_key": "sk-live-123", "model": "m"}
    out = tmp_path / "scored"
    records.prepare("judge_shard", {"out": str(out), "samples": "s", "judge": judge})
    write_dataset(out, pa.table({"prompt": ["a"]}), "prompts")
    text = "".join(p.read_text() for p in (tmp_path / ".alignflow" / "steps").iterdir())
    assert "sk-live-123" not in text and json.loads(text)["inputs"]["judge"]["api_key"] == "***"
    records.prepare("judge_shard", {"out": str(out), "samples": "s", "judge": dict(judge, api_key="sk-other")})
    assert out.exists()  # the same inputs but the secret: the output stands
    records.prepare("judge_shard", {"out": str(out), "samples": "s", "judge": dict(judge, model="m2")})
    assert not out.exists()  # another judge model: made again


def test_an_output_outside_the_run_folder_is_never_removed(tmp_path):
    outside = tmp_path / "shared" / "eval.json"
    outside.parent.mkdir()
    outside.write_text("{}")
    records = StepRecords(tmp_path / "run")
    with pytest.raises(ValueError, match="outside the run folder"):
        records.prepare("evaluate_policy", {"out": str(outside), "model": "m", "k": 2})
    assert outside.read_text() == "{}"
