"""CLI verbs generate -> judge -> rejection-sample -> critique on a tiny model, plus bad input."""

from __future__ import annotations

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from alignflow.flows.cli import app
from alignflow.schemas.store import read_dataset, read_manifest, write_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint

    root = tmp_path_factory.mktemp("cli")
    tok = make_char_tokenizer()
    save_checkpoint(make_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2), tok, root / "model")
    write_dataset(root / "prompts", pa.table({"prompt": ["Reverse: abc", "Copy exactly: xy"]}), "prompts", {"flow": "t"})
    return root


def test_generate_judge_rejection_critique(world):
    r = CliRunner()
    m = str(world / "model")
    res = r.invoke(app, ["generate", str(world / "prompts"), str(world / "samples"), "--model", m, "-k", "3",
                         "--max-new-tokens", "6", "--seed", "1"])
    assert res.exit_code == 0, res.output
    samples = read_manifest(world / "samples")
    assert samples["num_rows"] == 6 and samples["provenance"]["seed"] == 1
    assert samples["provenance"]["models"]["policy"]["backend"] == "hf"
    res = r.invoke(app, ["judge", str(world / "samples"), str(world / "pairs"), "--model", m, "--tie-band", "0"])
    assert res.exit_code == 0, res.output
    prov = read_manifest(world / "pairs")["provenance"]
    assert prov["judge"]["judge"] == "pairwise-llm" and "position_consistency" in prov["report"]
    res = r.invoke(app, ["rejection-sample", str(world / "samples"), str(world / "bon"), "--method", "best-of-n",
                         "--judge", "toy-task"])
    assert res.exit_code == 0, res.output
    assert read_manifest(world / "bon")["kind"] == "sft" and read_dataset(world / "bon").num_rows == 2
    res = r.invoke(app, ["critique", str(world / "samples"), str(world / "cai"), "--model", m,
                         "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert read_manifest(world / "cai" / "critiques")["provenance"]["constitution"]["name"] == "default"


def test_bad_input_is_one_line_exit_2(world, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["judge", str(tmp_path / "missing"), str(tmp_path / "o"), "--model", str(world / "model")])
    assert res.exit_code == 2 and "no such dataset folder" in res.output
    res = r.invoke(app, ["rejection-sample", str(world / "prompts"), str(tmp_path / "o")])
    assert res.exit_code == 2 and "reads a samples dataset" in res.output
    res = r.invoke(app, ["generate", str(world / "prompts"), str(tmp_path / "o"), "--model", "m", "--backend", "nope"])
    assert res.exit_code == 2 and "--backend must be one of" in res.output


def test_openai_judge_gets_the_tokenizer_for_echo_scoring():
    """``alignflow judge --backend openai --tokenizer T`` hands T to the client, which then
    scores any answer text through /completions echo instead of the chat top log-probs."""
    from alignflow.flows.commands.feedback import _make_judge

    judge = _make_judge("pairwise", "openai", "served-judge", "logprobs", False, 0.05, 1, 0, 8, None,
                        "http://127.0.0.1:9/v1", 2, "some/tokenizer")
    assert judge.generator._tokenizer == "some/tokenizer" and judge.generator.base_url == "http://127.0.0.1:9/v1"
    plain = _make_judge("pairwise", "openai", "served-judge", "logprobs", False, 0.05, 1, 0, 8, None,
                        "http://127.0.0.1:9/v1", 2)
    assert plain.generator._tokenizer is None
