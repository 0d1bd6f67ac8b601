"""Reward-guided beam search (survey 3.4.1, eq. 23; ``trainers.token_rewards``).

Exactness on a tiny random model (greedy = ``generate``; a wide beam finds the exhaustive
optimum; batched = one prompt; the returned score is the objective of the returned answer),
then the toy-world protocol of tests/bench/bench_beam.py: a larger beam raises the TASK reward
of DPO policies on fresh held-out prompts.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import TOKENIZERS, is_bpe, tiny_lm, tokenizer


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic float order, and as fast for these tiny models
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=TOKENIZERS)
def tiny(request, one_thread):
    """(random policy, random reference, tokenizer) in one world's shape (char Llama, BPE Qwen2)."""
    tok = tokenizer(request.param)
    return tiny_lm(tok, hidden_size=32, num_layers=1, seed=1).eval(), tiny_lm(tok, hidden_size=32, num_layers=1,
                                                                               seed=2).eval(), tok


PROMPTS = ["Spell out: 7", "Spell out: 415", "Copy exactly: abc"]


def test_beam_one_is_greedy_decoding(tiny):
    from alignflow.trainers.encoding import as_messages, encode_prompt
    from alignflow.trainers.token_rewards import beam_search_batch

    policy, ref, tok = tiny
    found = beam_search_batch(policy, ref, tok, PROMPTS, beam_size=1, max_new_tokens=6)
    for prompt, (text, _) in zip(PROMPTS, found):
        ids = torch.tensor([encode_prompt(tok, as_messages(prompt))])
        out = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _exhaustive_best(policy, tok, prompt, beta):
    """Best summed beta*log pi over every answer of at most 2 new tokens (eos-terminated, or cut
    at 2 tokens without eos)."""
    from alignflow.trainers.encoding import as_messages, encode_prompt

    ids = encode_prompt(tok, as_messages(prompt))
    with torch.no_grad():
        first = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        vocab = first.shape[0]
        rows = torch.tensor([ids + [a] for a in range(vocab)])
        second = torch.log_softmax(policy(input_ids=rows).logits[:, -1].float(), -1)  # [V, V]
    eos = tok.eos_token_id
    best_eos_first = float(first[eos])
    keep = torch.arange(vocab) != eos
    two = first[keep, None] + second[keep]  # [a, b] for a != eos: either b = eos or cut after b
    return beta * max(best_eos_first, float(two.max()))


def test_wide_beam_finds_the_exhaustive_optimum(tiny):
    from alignflow.trainers.token_rewards import beam_search_batch

    policy, ref, tok = tiny
    vocab = len(tok)
    found = beam_search_batch(policy, ref, tok, PROMPTS, beam_size=vocab, expand=vocab, max_new_tokens=2, beta=0.5)
    greedy = beam_search_batch(policy, ref, tok, PROMPTS, beam_size=1, max_new_tokens=2, beta=0.5)
    for prompt, (_, score), (_, g) in zip(PROMPTS, found, greedy):
        assert score == pytest.approx(_exhaustive_best(policy, tok, prompt, 0.5), abs=1e-4)
        assert score >= g - 1e-6


def _objective_of_ids(policy, ref, tok, prompt, ids, beta, objective) -> float:
    """The summed objective of response tokens ``ids`` after ``prompt``, from one plain forward."""
    from alignflow.trainers import encoding

    prompt_ids = encoding.encode_prompt(tok, encoding.as_messages(prompt))
    x = torch.tensor([prompt_ids + list(ids)])
    target = torch.tensor(ids)[:, None]

    def logps(model):
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, len(prompt_ids) - 1:-1].double()
        return torch.log_softmax(logits, -1).gather(-1, target)[:, 0]

    gain = logps(policy) if objective == "q" else logps(policy) - logps(ref)
    return beta * float(gain.sum())


@pytest.mark.parametrize("objective", ["q", "reward"])
def test_score_is_the_objective_of_the_answer_and_batching_changes_nothing(request, tiny, objective):
    """On the world's SFT policy against a random reference: the score is the objective of the
    searched tokens (an independent forward), one prompt alone finds what the batch found, and
    where the text re-encodes to the searched tokens (always, one token per character; with BPE
    not always: 'twoty-seven' searched as other pieces than its own tokenization), re-scoring
    the text token by token gives the score too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.trainers.token_rewards import beam_search, beam_search_batch, token_rewards

    world = request.getfixturevalue("bpe_world" if is_bpe(tiny[2]) else "toy_world")
    tok = AutoTokenizer.from_pretrained(world.path)  # the world's own vocabulary
    policy = AutoModelForCausalLM.from_pretrained(world.path).eval()
    ref = tiny_lm(tok, hidden_size=32, num_layers=1, seed=2).eval()
    found = beam_search_batch(policy, ref, tok, PROMPTS, beam_size=3, max_new_tokens=5, beta=0.2, objective=objective,
                              with_ids=True)
    canonical = 0
    for prompt, (text, score, ids) in zip(PROMPTS, found):
        assert score == pytest.approx(_objective_of_ids(policy, ref, tok, prompt, ids, 0.2, objective), abs=1e-4)
        assert beam_search(policy, ref, tok, prompt, beam_size=3, max_new_tokens=5, beta=0.2,
                           objective=objective) == pytest.approx((text, score))
        finished = ids[-1] == tok.eos_token_id
        if tok(text, add_special_tokens=False)["input_ids"] != [t for t in ids if t != tok.eos_token_id]:
            assert is_bpe(tok), (text, ids)  # one token per character always re-encodes the same
            continue
        canonical += 1
        rows = token_rewards(policy, ref, tok, prompt, text, beta=0.2, finished=finished)
        want = sum(r.reward for r in rows) if objective == "reward" else 0.2 * sum(r.logp for r in rows)
        assert score == pytest.approx(want, abs=1e-3)
    assert canonical >= 1


def test_token_texts_join_to_the_text_whatever_the_byte_split(tiny):
    """A byte-level BPE token may hold half a character: each token's piece is what it adds to
    the decoded text (never U+FFFD), and the pieces join to the text."""
    from alignflow.trainers.token_rewards import token_rewards, token_texts

    policy, ref, tok = tiny
    text = "forty-twé ☃ ok" if is_bpe(tok) else "forty-two ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    rows = token_rewards(policy, ref, tok, "Spell out: 42", text)
    assert "".join(r.token for r in rows) == text + tok.eos_token


def test_rejects_bad_arguments(tiny):
    from alignflow.trainers.token_rewards import beam_search_batch

    policy, ref, tok = tiny
    with pytest.raises(ValueError, match="objective"):
        beam_search_batch(policy, ref, tok, PROMPTS, objective="likelihood")
    with pytest.raises(ValueError, match="beam_size"):
        beam_search_batch(policy, ref, tok, PROMPTS, beam_size=0)


@pytest.mark.slow
def test_larger_beam_raises_the_task_reward_of_dpo_policies(toy_world, one_thread):
    """Protocol v2 of tests/bench/bench_beam.py (fixed after calibration on other prompts and
    DPO seeds, before these were measured): three DPO policies (iterative DPO, 32 training
    tokens so no sample is cut off, lr 1e-4, seeds 0-2) searched with eq. 23's Q objective on
    192 fresh held-out prompts; the TASK reward of beam 8 beats greedy's (one-sided paired
    t-test over prompts, each prompt's reward averaged over the three policies). Measured once:
    0.9516 -> 0.9563, p = 0.0047 (beam 2: 0.9568, p = 0.0066); per policy 0.951 -> 0.959,
    0.950 -> 0.952, 0.954 -> 0.958. The SFT model with the same beam (plain maximum-likelihood
    decoding) reaches as much, 0.9570: see the bench's docstring."""
    import numpy as np
    from scipy.stats import ttest_rel
    from transformers import AutoModelForCausalLM

    from alignflow.trainers.encoding import as_messages
    from tests.bench.bench_beam import (
        DPO_SEEDS,
        dpo_policy,
        evaluation_prompt_texts,
        search_rewards,
        train_prompt_texts,
    )

    train_prompts = [as_messages(p) for p in train_prompt_texts(toy_world.task)]
    prompts = [as_messages(p) for p in evaluation_prompt_texts(toy_world.task)]
    ref = AutoModelForCausalLM.from_pretrained(toy_world.path).eval()
    greedy, beam8, scores = [], [], []
    for seed in DPO_SEEDS:
        policy, tok = dpo_policy(toy_world, train_prompts, seed)
        found = search_rewards(policy, ref, tok, toy_world.task, prompts, (1, 8), "q")
        greedy.append(found[1][0])
        beam8.append(found[8][0])
        scores.append((found[1][1], found[8][1]))
    greedy, beam8 = np.mean(greedy, 0), np.mean(beam8, 0)
    assert len(prompts) == 192 and greedy.mean() < 0.97  # headroom: greedy is imperfect here
    p = ttest_rel(beam8, greedy, alternative="greater").pvalue
    assert beam8.mean() > greedy.mean() and p < 0.05, (greedy.mean(), beam8.mean(), p)
    # what the search optimises rises too (and never falls per prompt here)
    assert all((b >= g - 1e-6).all() for g, b in scores)
