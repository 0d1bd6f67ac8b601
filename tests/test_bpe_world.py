"""The BPE world: byte-level BPE tokenizer with a ChatML template, tiny Qwen2, the built world."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from alignflow.feedback.toy_task import ToyTask  # noqa: E402
from alignflow.flows.bpe_world import tokenizer_corpus  # noqa: E402
from alignflow.trainers.bpe_model import IM_END, IM_START, PAD, make_tiny_qwen2, train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(tokenizer_corpus(ToyTask().sft_examples(2000, seed=0)), num_merges=300)


def test_bpe_tokenizer_merges_chars_and_has_chatml(tokenizer):
    merges = len(tokenizer) - 3 - 256
    assert merges == 300  # several hundred merges learned from the corpus
    for word in ("forty", " hundred", "seven"):  # frequent words are single tokens
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "three hundred forty-two"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text) / 3 and tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("Hello wörld ☃ 12\n\n  x")["input_ids"]) == "Hello wörld ☃ 12\n\n  x"  # bytes
    assert [tokenizer.decode([i]) for i in tokenizer("Spell out: 342", add_special_tokens=False)["input_ids"][-3:]] \
        == ["3", "4", "2"]  # digits stay single tokens
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == PAD
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None and tokenizer.padding_side == "left"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == \
        f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\nyo{IM_END}\n"
    assert tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == \
        f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    assert train_bpe_tokenizer(tokenizer_corpus(ToyTask().sft_examples(2000, seed=0)),
                               num_merges=300).get_vocab() == tokenizer.get_vocab()  # deterministic


def test_tiny_qwen2_is_gqa_tied_and_seeded(tokenizer):
    a, b = make_tiny_qwen2(tokenizer, hidden_size=32, seed=3), make_tiny_qwen2(tokenizer, hidden_size=32, seed=3)
    assert type(a).__name__ == "Qwen2ForCausalLM"
    assert a.config.num_key_value_heads < a.config.num_attention_heads
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # tied
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError):
        make_tiny_qwen2(tokenizer, num_heads=4, num_kv_heads=4)


def test_bpe_world_reward_spread(bpe_world):
    stats = bpe_world.stats  # measured as the toy world's: 64 held-out prompts, K = 4, temperature 1
    assert 0.3 <= stats["mean_reward"] <= 0.7, stats
    assert stats["frac_prompts_with_spread"] >= 0.8, stats
    assert stats["mean_max_minus_min"] >= 0.25, stats


def test_bpe_world_loads_in_a_fresh_process_without_custom_code(bpe_world):
    """AutoTokenizer / AutoModelForCausalLM, no trust_remote_code, no python files in the folder,
    the template and special tokens read from tokenizer_config.json."""
    path = bpe_world.path
    assert not list(path.glob("*.py"))
    saved = json.loads((path / "tokenizer_config.json").read_text())
    assert saved["chat_template"].startswith("{% for message in messages %}") and saved["eos_token"] == IM_END
    assert saved["pad_token"] == PAD and saved["padding_side"] == "left"
    probe = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(path)!r}, trust_remote_code=False)
model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=False)
ids = tok.apply_chat_template([{{"role": "user", "content": "Spell out: 42"}}], add_generation_prompt=True)
ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
print(json.dumps({{"model": type(model).__name__, "eos": tok.eos_token, "pad": tok.pad_token,
                  "side": tok.padding_side, "kv": model.config.num_key_value_heads,
                  "heads": model.config.num_attention_heads, "tied": model.config.tie_word_embeddings,
                  "answer": tok.decode(out[0, len(ids):], skip_special_tokens=True),
                  "last": int(out[0, -1]), "eos_id": tok.eos_token_id}}))
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["model"] == "Qwen2ForCausalLM" and seen["eos"] == IM_END and seen["pad"] == PAD
    assert seen["side"] == "left" and seen["kv"] < seen["heads"] and seen["tied"]
    assert seen["last"] == seen["eos_id"]  # greedy decoding ends its turn with <|im_end|>
    assert bpe_world.task.reward("Spell out: 42", seen["answer"]) > 0.5, seen


def test_bpe_world_rebuild_is_reused_and_keeps_its_own_folder(bpe_world, tmp_path):
    from alignflow.flows.bpe_world import build_bpe_world
    from alignflow.flows.worlds import build_embedded_world

    started = time.perf_counter()
    again = build_embedded_world("bpe", bpe_world.path.parent, seed=0)
    assert time.perf_counter() - started < 2.0
    assert again.path == bpe_world.path and again.stats == bpe_world.stats
    assert bpe_world.path.name != "sft-model"  # the toy's checkpoint folder name: both may share a folder
    with pytest.raises(ValueError, match="unknown world"):
        build_embedded_world("nope", tmp_path)
    assert build_bpe_world(bpe_world.path.parent, seed=0).stats == bpe_world.stats


def test_bpe_world_is_selectable_in_the_demo_and_the_align_config(bpe_world, tmp_path):
    from typer.testing import CliRunner

    from alignflow.flows.align import world_step
    from alignflow.flows.cli import app
    from alignflow.flows.config import load_config
    from alignflow.flows.tasks import build_world

    result = CliRunner().invoke(app, ["demo", "--world", "bpe", "--world-only", "--output", str(bpe_world.path.parent)])
    assert result.exit_code == 0, result.output
    assert "bpe world" in result.output and f"{bpe_world.stats['mean_reward']:.3f}" in result.output
    bad = CliRunner().invoke(app, ["demo", "--world", "nope", "--world-only"])
    assert bad.exit_code == 2 and "--world 'nope'" in bad.output
    assert load_config("align").world == "toy"  # the default main job is unchanged
    config = load_config("align", overrides=["world=bpe"])
    step = world_step(config, tmp_path)
    assert step["world"] == "bpe" and step["out"] == str(tmp_path / "bpe-world")
    with pytest.raises(ValueError, match="field world"):
        load_config("align", overrides=["world=nope"])
    built = build_world(str(bpe_world.path.parent), seed=0, world="bpe")  # the flow's step: the cached build
    assert built["path"] == str(bpe_world.path) and built["stats"]["mean_reward"] == bpe_world.stats["mean_reward"]
