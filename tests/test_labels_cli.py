"""`alignflow formats` / `alignflow convert` and the `convert_labels` Prefect flow."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignflow.flows.cli import app
from alignflow.schemas.store import read_dataset, read_manifest

runner = CliRunner()


def test_formats_lists_every_format():
    result = runner.invoke(app, ["formats"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("hh-rlhf", "graded-pairwise", "trl-preference", "label-studio", "openai-dpo", "listwise"):
        assert name in result.output


def test_convert_prints_accounting_and_writes_provenance(human_labels, tmp_path):
    out = tmp_path / "alpaca"
    result = runner.invoke(app, ["convert", str(human_labels / "alpaca_eval_gpt4_annotations_alpaca-7b.json"), str(out),
                                 "--from", "alpaca-eval", "--to", "listwise", "--ties", "keep",
                                 "--quarantine", str(tmp_path / "q")], terminal_width=200)
    assert result.exit_code == 0, result.output
    # 805 rows; 16 draws of identical outputs are dropped by rule (not errors), even with --ties keep
    assert "read 805 = written 789 + quarantined 0 + dropped-by-rule 16 (records); 789 listwise rows out" in result.output
    assert "dropped-by-rule 16: tie of two identical texts (nothing to compare)" in result.output
    manifest = read_manifest(out)
    prov = manifest["provenance"]
    assert prov["source_format"] == "alpaca-eval" and prov["options"]["ties"] == "keep"
    assert prov["source_sha256"] == "d44ea50f1a81f6ae6a95e8ac1dd08b7eca82cc0a9058a2923b1c70cec1e9eaa5"
    assert read_dataset(tmp_path / "q").num_rows == 0


@pytest.mark.parametrize("args,message", [
    (["--from", "nope", "--to", "pairwise"], "unknown format 'nope'"),
    (["--from", "hh-rlhf", "--to", "pairwise"], "row 0: field 'chosen': missing"),
    (["--from", "alpaca-eval", "--to", "pairwise", "--strategy", "zigzag"], "unknown --strategy"),
])
def test_bad_input_is_one_line_exit_2(human_labels, tmp_path, args, message):
    src = human_labels / "alpaca_eval_gpt4_annotations_alpaca-7b.json"
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "o"), *args], terminal_width=300)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unreadable_file_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    result = runner.invoke(app, ["convert", str(bad), str(tmp_path / "o"), "--from", "hh-rlhf", "--to", "pairwise"],
                           terminal_width=300)
    assert result.exit_code == 2 and "bad.jsonl.gz: unreadable" in result.output and "Traceback" not in result.output


def test_flow_plain_functions(tmp_path):
    from alignflow.flows import convert_labels as fl

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                           for i in range(6)))
    facts = fl.check_source_fn(str(src), "trl-preference", "openai-dpo")
    assert facts["to"] == "openai-dpo" and len(facts["sha256"]) == 64
    with pytest.raises(ValueError, match="unknown format"):
        fl.check_source_fn(str(src), "trl-preference", "nope")
    result = fl.convert_fn(str(src), str(tmp_path / "dpo.jsonl"), "trl-preference", "openai-dpo", {"ties": "drop"})
    assert result["written"] == 6 and fl.verify_output_fn(result["output"])["verified"]
    assert "read 6 = written 6" in result["line"]


@pytest.mark.slow
def test_one_flow_run(tmp_path):
    """One real run of the flow on the embedded server (about 11 s to start it)."""
    from prefect.testing.utilities import prefect_test_harness

    from alignflow.flows import convert_labels as fl
    from alignflow.flows.runtime import prefect_session

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                           for i in range(6)))
    with prefect_test_harness(server_startup_timeout=90), prefect_session():
        out = fl.convert_labels(str(src), str(tmp_path / "ds"), "trl-preference", "binary")
    assert out["verify"] == {"kind": "binary", "rows": 12, "verified": True}
    assert out["read"] == 6 and out["written"] == 6 and len(out["source_sha256"]) == 64


def test_convert_prints_paths_as_they_are(tmp_path):
    """The accounting and 'wrote' lines are plain text: brackets in a path are not rich markup."""
    folder = tmp_path / "run [bold] [x]"
    folder.mkdir()
    src = folder / "pairs.jsonl"
    src.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}) + "\n")
    out = folder / "out.parquet"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--from", "hh-rlhf", "--to", "trl-preference"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert "read 1 = written 1 + quarantined 0 + dropped-by-rule 0" in result.output


def test_an_error_names_a_bracketed_path_as_it_is(tmp_path):
    missing = tmp_path / "labels [x]" / "pairs.jsonl"
    result = CliRunner().invoke(app, ["convert", str(missing), str(tmp_path / "o.parquet"), "--from", "hh-rlhf",
                                      "--to", "trl-preference"])
    assert result.exit_code == 2
    assert f"{missing}: no such file" in result.output
