"""The toy world: char tokenizer + chat template, tiny Llama, task and reward, SFT, the built world."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from alignflow.feedback.toy_task import ToyTask, spell_number  # noqa: E402
from alignflow.trainers.sft import IGNORE_INDEX, PadCollator, sft_loss, tokenize_sft_example, train_sft  # noqa: E402
from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint  # noqa: E402


# -- tokenizer and model -----------------------------------------------------------------------
def test_char_tokenizer_round_trip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = make_char_tokenizer()
    text = "Spell out: 42\n{ok} ~ [x]!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<bos><|user|>hi<|assistant|>"
    full = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert full == "<bos><|user|>hi<|assistant|>yo<eos>"
    assert tok(rendered, add_special_tokens=False)["input_ids"] == [
        tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>"), *tok("hi", add_special_tokens=False)["input_ids"],
        tok.convert_tokens_to_ids("<|assistant|>")]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True) == rendered
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 2, 1)


def test_tiny_llama_is_seeded_and_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_char_tokenizer()
    a = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=3)
    b = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=3)
    c = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    save_checkpoint(a, tok, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert torch.equal(loaded.model.embed_tokens.weight, a.model.embed_tokens.weight)


# -- task and reward -----------------------------------------------------------------------------
def test_spell_number():
    assert [spell_number(n) for n in (0, 7, 13, 40, 42, 100, 305, 999)] == [
        "zero", "seven", "thirteen", "forty", "forty-two", "one hundred", "three hundred five",
        "nine hundred ninety-nine"]


def test_task_reward_partial_credit_and_length_knob():
    task = ToyTask()
    prompt = "Spell out: 42"
    assert task.reference(prompt) == "forty-two"
    assert task.reward(prompt, "forty-two") == 1.0
    assert task.reward(prompt, "") == 0.0
    assert 0.0 < task.reward(prompt, "forty-one") < 1.0
    assert task.reward(prompt, "forty-twoooooo") < 1.0  # extra characters cost with w = 0
    biased = ToyTask(length_weight=0.5)
    # With w > 0 a longer wrong answer beats a short, equally wrong one.
    assert biased.reward(prompt, "xxxxxxxxxxxxxxxx") > biased.reward(prompt, "xxxx")
    assert biased.reward(prompt, "forty-two") == pytest.approx(0.5 + 0.5 * 0.5)
    assert biased.length_bonus(prompt, "x" * 30) == 1.0 and biased.length_bonus(prompt, "x") == 0.0
    rewards = task.rewards([prompt] * 3, ["forty-two", "fifty-two", "zzz"])
    assert rewards.shape == (3,) and ((rewards >= 0) & (rewards <= 1)).all()
    with pytest.raises(ValueError):
        ToyTask(length_weight=1.5)
    with pytest.raises(ValueError):
        task.reference("not a task prompt")


def test_prompts_seeded_and_sft_data_of_mixed_quality():
    task = ToyTask()
    assert task.prompts(20, seed=1) == task.prompts(20, seed=1)
    assert task.prompts(20, seed=1) != task.prompts(20, seed=2)
    examples = task.sft_examples(400, seed=0)
    assert examples == task.sft_examples(400, seed=0)
    rewards = task.rewards([p for p, _ in examples], [r for _, r in examples])
    exact = np.mean([r == task.reference(p) for p, r in examples])
    assert 0.1 < exact < 0.6
    assert 0.5 < rewards.mean() < 0.9
    assert rewards.std() > 0.15


# -- SFT -----------------------------------------------------------------------------------------
def test_sft_labels_mask_prompt_and_loss_is_per_example_mean():
    tok = make_char_tokenizer()
    row = tokenize_sft_example(tok, "Spell out: 5", "five")
    n_prompt = len("<bos><|user|>Spell out: 5<|assistant|>".replace("<bos>", "B").replace("<|user|>", "U")
                   .replace("<|assistant|>", "A"))
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tok.eos_token_id and len(row["input_ids"]) == n_prompt + 5
    batch = PadCollator(tok.pad_token_id)([row, tokenize_sft_example(tok, "Spell out: 21", "twenty-one")])
    logits = torch.randn(*batch["input_ids"].shape, len(tok), generator=torch.Generator().manual_seed(0))
    logp = logits.log_softmax(-1)
    manual = []
    for b in range(2):
        labels = batch["labels"][b]
        terms = [-logp[b, t - 1, labels[t]] for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX]
        manual.append(torch.stack(terms).mean())
    assert sft_loss(logits, batch["labels"]).item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)


def test_train_sft_is_deterministic_and_lowers_loss(tmp_path):
    tok = make_char_tokenizer()
    examples = ToyTask().sft_examples(96, seed=0)

    def run(folder):
        model = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=0)
        train_sft(model, tok, examples, tmp_path / folder, per_device_train_batch_size=16, max_steps=6,
                  learning_rate=1e-2, use_cpu=True, seed=0)
        return model

    first, second = run("a"), run("b")
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), second.state_dict().values()))
    fresh = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=0)
    batch = PadCollator(tok.pad_token_id)([tokenize_sft_example(tok, p, r) for p, r in examples[:32]])
    with torch.no_grad():
        before = sft_loss(fresh(input_ids=batch["input_ids"]).logits, batch["labels"])
        after = sft_loss(first(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert after < before
    assert (tmp_path / "a" / "config.json").is_file() and (tmp_path / "a" / "tokenizer.json").is_file()


# -- the built toy world (session fixture) ------------------------------------------------------
def test_toy_world_reward_spread(toy_world):
    stats = toy_world.stats
    assert 0.3 <= stats["mean_reward"] <= 0.7, stats
    assert stats["k"] == 4 and stats["temperature"] == 1.0
    assert stats["frac_prompts_with_spread"] >= 0.8, stats  # preference pairs exist
    assert stats["within_prompt_std"] >= 0.1, stats
    assert stats["mean_max_minus_min"] >= 0.25, stats


def test_toy_world_checkpoint_loads_and_knows_the_task(toy_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.schemas.generator import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(toy_world.path)
    tok = AutoTokenizer.from_pretrained(toy_world.path)
    generator = HFGenerator(model, tok, device="cpu", num_threads=1)
    prompts = toy_world.task.prompts(16, seed=77)
    greedy = generator.generate([[{"role": "user", "content": p}] for p in prompts], n=1,
                                sampling=SamplingParams(temperature=0.0, max_new_tokens=40))
    rewards = toy_world.task.rewards(prompts, [g[0].text for g in greedy])
    # The SFT'd policy knows the answers; its mixed quality is in how it samples.
    assert rewards.mean() > toy_world.stats["mean_reward"] + 0.1


def test_length_knob_rewards_longer_samples(toy_world):
    """Among differing samples of one prompt, the longer wins ~half the time at w = 0, clearly more at w > 0."""
    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.schemas.generator import SamplingParams

    prompts = toy_world.task.prompts(48, seed=9)
    gens = HFGenerator(toy_world.path, device="cpu").generate(
        [[{"role": "user", "content": p}] for p in prompts], n=4, sampling=SamplingParams(max_new_tokens=40, seed=0))
    flat_prompts = [p for p in prompts for _ in range(4)]
    texts = [g.text for samples in gens for g in samples]
    lengths = np.array([len(t) for t in texts]).reshape(-1, 4)

    def longer_wins(weight):
        rewards = ToyTask(length_weight=weight).rewards(flat_prompts, texts).reshape(-1, 4)
        wins = [rewards[i, a] > rewards[i, b] for i in range(len(prompts)) for a in range(4) for b in range(4)
                if lengths[i, a] > lengths[i, b] and rewards[i, a] != rewards[i, b]]
        return np.mean(wins)

    assert longer_wins(0.0) < 0.6
    assert longer_wins(0.75) > longer_wins(0.0) + 0.15


def test_toy_world_rebuild_is_reused(toy_world):
    from alignflow.flows.toy_world import build_toy_world

    started = time.perf_counter()
    again = build_toy_world(toy_world.path.parent, seed=0)
    assert time.perf_counter() - started < 2.0
    assert again.path == toy_world.path and again.stats == toy_world.stats


def test_demo_command_prints_reward_statistics(toy_world):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    result = CliRunner().invoke(app, ["demo", "--world-only", "--output", str(toy_world.path.parent)])
    assert result.exit_code == 0, result.output
    assert "mean reward" in result.output and f"{toy_world.stats['mean_reward']:.3f}" in result.output


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Batch 16 in one step == 2 accumulated micro-batches of 8 (plain SGD: the gradient's scale shows)."""
    tok = make_char_tokenizer()
    examples = ToyTask().sft_examples(16, seed=3)

    def run(folder, batch, accumulation):
        model = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=0)
        train_sft(model, tok, examples, tmp_path / folder, save=False, per_device_train_batch_size=batch,
                  gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
                  max_grad_norm=0.0, lr_scheduler_type="constant", use_cpu=True, seed=0)
        return model

    big, accumulated = run("a", 16, 1), run("b", 8, 2)
    for (name, x), y in zip(big.state_dict().items(), accumulated.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5), name
    start = make_tiny_llama(tok, hidden_size=16, num_heads=2, seed=0)
    assert not torch.allclose(start.lm_head.weight, big.lm_head.weight)  # the step did move the weights
