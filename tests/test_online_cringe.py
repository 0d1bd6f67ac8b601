"""Iterative pairwise CRINGE (survey 3.5.2, eq. 29-30) on the toy world.

The reward test follows tests/test_online.py: held-out prompts, the same sampling seed before
and after (paired), one-sided paired t-test p < 0.05. It runs with the defaults a user gets
(``CRINGE_DEFAULTS``: alpha 0.03, k 5, gate b 100 / tau 10, negatives = the rejected answer's
first token that departs from the chosen one). Measured with these settings (3 rounds, 64
held-out prompts): seeds 0-4 all rose, p <= 3e-4 (0.54 -> 0.68 at seed 0).
"""

from __future__ import annotations

import pytest
import torch

from alignflow.schemas.generator import SamplingParams

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.5 M-parameter model: one thread is as fast, and steadier
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_cringe_raises_reward_with_default_settings(toy_world, one_thread):
    from scipy.stats import ttest_rel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.flows.online import policy_generator_factory, toy_reward
    from alignflow.trainers.encoding import as_messages
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    reward = toy_reward(toy_world.task)
    prompts = [as_messages(p) for p in toy_world.task.prompts(64, seed=11)]
    eval_prompts = [as_messages(p) for p in toy_world.task.prompts(64, seed=12)]
    cfg = IterativeConfig(method="cringe", rounds=3, prompts_per_round=32, k=4, epochs=2, batch_size=16, lr=3e-4,
                          terminate=False, sampling=SAMPLING)
    _, report = train_iterative(AutoModelForCausalLM.from_pretrained(toy_world.path),
                                AutoTokenizer.from_pretrained(toy_world.path), prompts,
                                policy_generator_factory("cpu"), cfg, reward_fn=reward,
                                eval_prompts=eval_prompts, eval_reward_fn=reward)
    before, after = report.extra["eval_rewards_before"], report.extra["eval_rewards_after"]
    p = ttest_rel(after, before, alternative="greater").pvalue
    assert report.reward_after > report.reward_before and p < 0.05, (p, report.reward_before, report.reward_after)
    assert [h["round"] for h in report.history] == [1, 2, 3] and all(h["pairs"] > 0 for h in report.history)
    assert report.generations == 3 * 32 * 4 and report.judge_calls == 3 * 32 * 4


def test_negative_flags_pick_the_tokens_to_contrast():
    from alignflow.trainers.online.iterative import cringe_negative_flags

    eos = 0
    chosen = [5, 6, 7, 8, eos]
    rejected = [5, 6, 9, 8, 4, eos]  # departs at index 2, shares 8 afterwards, one extra token
    assert cringe_negative_flags(chosen, rejected, "all", eos) == [True] * 6
    assert cringe_negative_flags(chosen, rejected, "after_divergence", eos) == [False, False, True, True, True, True]
    assert cringe_negative_flags(chosen, rejected, "first_divergence", eos) == [False, False, True, False, False, False]
    assert cringe_negative_flags(chosen, rejected, "diff", eos) == [False, False, True, False, True, False]
    # a rejected answer that is a prefix of the chosen one departs at its eos: nothing to contrast
    assert not any(cringe_negative_flags(chosen, [5, 6, eos], "first_divergence", eos))
    with pytest.raises(ValueError, match="negatives"):
        cringe_negative_flags(chosen, rejected, "some")


def test_pair_loss_contrasts_only_the_flagged_tokens():
    """The contrast reaches the policy only through the flagged rejected tokens: with a
    rejected answer that equals the chosen one up to its last character, the default
    (first departing token) contrasts that one position; "all" contrasts every position."""
    from alignflow.trainers.online import iterative as loop
    from alignflow.trainers.online.iterative import Pair
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    tok = make_char_tokenizer()
    model = make_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2)
    pairs = [Pair([{"role": "user", "content": "Spell out: 42"}], "forty-two", "forty-twx")]
    first = loop._cringe_rejected_tensors(model, tok, pairs, k=3, negatives="first_divergence")
    every = loop._cringe_rejected_tensors(model, tok, pairs, k=3, negatives="all")
    n_resp = len("forty-twx") + 1  # characters + eos
    assert int(every["rejected_token_mask"].sum()) == n_resp
    assert int(first["rejected_token_mask"].sum()) == 1
    on = first["rejected_token_mask"][0].nonzero().flatten()
    resp = every["rejected_token_mask"][0].nonzero().flatten()
    assert int(on) == int(resp[len("forty-tw")])  # the 'x'


@pytest.mark.slow
def test_negative_term_lowers_the_probability_of_the_contrasted_tokens(toy_world, one_thread):
    """The same pairs (best vs worst of 4 samples of the SFT policy), the same seeds, two epochs of
    iterative pairwise CRINGE with alpha = 0 (gated SFT on the chosen answers), the default 0.03
    and 0.3: the mean probability the policy gives the contrasted tokens (each rejected answer's
    first token departing from the chosen one, in its context) is lower the larger alpha.

    Measured (61 pairs): 0.166 at alpha 0, 0.159 at 0.03, 0.110 at 0.3 (0.161 before training).
    The mean LOG-probability moves the other way (-4.43, -4.39, -4.17): the contrast lowers the
    negatives the policy was likely to emit (base probability > 0.2: -0.68 nats at alpha 0.3) and
    lifts their top-k alternatives, which are the unlikely negatives of other pairs (+0.47 nats)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.flows.online import policy_generator_factory, toy_reward
    from alignflow.trainers import modeling
    from alignflow.trainers.encoding import as_messages, encode_prompt, encode_response
    from alignflow.trainers.online.iterative import (
        IterativeConfig,
        build_pairs,
        cringe_negative_flags,
        train_on_pairs,
    )

    tok = AutoTokenizer.from_pretrained(toy_world.path)
    prompts = [as_messages(p) for p in toy_world.task.prompts(64, seed=21)]
    sft = AutoModelForCausalLM.from_pretrained(toy_world.path)
    gens = policy_generator_factory("cpu")(sft, tok).generate(prompts, n=4, sampling=SamplingParams(
        temperature=1.0, max_new_tokens=24, seed=5))
    pairs = build_pairs(IterativeConfig(method="cringe"), prompts, [[g.text for g in gs] for gs in gens],
                        toy_reward(toy_world.task))
    contrasted = []  # (pair, index of its contrasted token in the rejected answer)
    for pair in pairs:
        flags = cringe_negative_flags(encode_response(tok, pair.chosen), encode_response(tok, pair.rejected),
                                      "first_divergence", tok.eos_token_id)
        if any(flags):
            contrasted.append((pair, flags.index(True)))
    assert len(contrasted) > 40

    @torch.no_grad()
    def mean_probability(model) -> float:
        probs = []
        for pair, i in contrasted:
            prompt_ids = encode_prompt(tok, pair.prompt)
            ids = prompt_ids + encode_response(tok, pair.rejected)
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            probs.append(float(torch.softmax(logits[len(prompt_ids) + i - 1], -1)[ids[len(prompt_ids) + i]]))
        return sum(probs) / len(probs)

    after = {}
    for alpha in (0.0, 0.03, 0.3):
        policy = AutoModelForCausalLM.from_pretrained(toy_world.path)
        torch.manual_seed(0)
        cfg = IterativeConfig(method="cringe", epochs=2, batch_size=16, lr=3e-4, loss_params={"alpha": alpha})
        train_on_pairs(cfg, policy, modeling.frozen_copy(policy), tok, [p for p, _ in contrasted],
                       torch.optim.AdamW(policy.parameters(), lr=cfg.lr), torch.Generator().manual_seed(0))
        after[alpha] = mean_probability(policy)
    assert after[0.03] < after[0.0] - 0.002 and after[0.3] < 0.8 * after[0.0], after
