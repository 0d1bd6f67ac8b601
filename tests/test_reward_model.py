"""Bradley-Terry reward model (eq. 1) and pairwise preference model on the toy world."""

from __future__ import annotations

import random

import pytest
import torch

from alignflow.trainers.reward_model import RankedExample, listwise_rewards, pairwise_accuracy


def _ranked_examples(task, n: int, seed: int, k: int = 4) -> list[RankedExample]:
    """K answers of graded quality per prompt (corrupted references), scored by the toy reward."""
    rng = random.Random(seed)
    out = []
    for prompt in task.prompts(n, seed=seed):
        ref = task.reference(prompt)
        responses = [ref] + [task.corrupt(ref, rng) for _ in range(k - 1)]
        out.append(RankedExample([{"role": "user", "content": prompt}], responses,
                                 [task.reward(prompt, r) for r in responses]))
    return out


class _FixedRewards(torch.nn.Module):
    """A stand-in 'model' whose reward is the response length: checks the C(K,2) batching."""

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": attention_mask.sum(-1, keepdim=True).float()})()


def test_all_pairs_of_a_prompt_in_one_batch_and_accuracy():
    from alignflow.trainers.toy_model import make_char_tokenizer

    tok = make_char_tokenizer()
    ex = [RankedExample([{"role": "user", "content": "q"}], ["a", "aaa", "aa"], [0.0, 2.0, 1.0]),
          RankedExample([{"role": "user", "content": "q"}], ["aa", "a"], [1.0, 1.0])]  # a tie: no pair
    b = listwise_rewards(_FixedRewards(), tok, ex)
    assert b["rewards"].shape == (2, 3) and b["mask"].tolist() == [[True] * 3, [True, True, False]]
    # longer = higher reward = higher score in example 0: all 3 pairs right; example 1 has none
    assert pairwise_accuracy(_FixedRewards(), tok, ex) == 1.0
    from alignflow.trainers.losses import compute_loss

    loss = compute_loss("bt", b)
    assert loss[1] == 0  # only tied pairs: counts nowhere
    d = torch.tensor([2.0, 1.0, 1.0])  # reward gaps of the three ordered pairs (length differences)
    assert loss[0].item() == pytest.approx(float(-torch.nn.functional.logsigmoid(d).mean()), abs=1e-5)


@pytest.mark.slow
def test_bt_reward_model_learns_toy_preferences(toy_world):
    from transformers import AutoTokenizer

    from alignflow.trainers.reward_model import RewardModelConfig, make_reward_model, train_reward_model

    tok = AutoTokenizer.from_pretrained(toy_world.path)
    train = _ranked_examples(toy_world.task, 96, seed=1)
    held = _ranked_examples(toy_world.task, 32, seed=2)
    rm = make_reward_model(toy_world.path, tok)
    metrics = train_reward_model(rm, tok, train, held, RewardModelConfig(epochs=3, lr=1e-3, prompts_per_batch=16))
    assert metrics["pairs"] == 96 * 6
    assert metrics["eval_accuracy"] > 0.7, metrics
    assert metrics["eval_accuracy"] > metrics["eval_accuracy_before"] + 0.1, metrics


@pytest.mark.slow
def test_preference_model_is_position_debiased_and_learns(toy_world):
    from transformers import AutoTokenizer

    from alignflow.trainers.preference_model import PreferenceModelConfig, preference_probs, train_preference_model
    from alignflow.trainers.reward_model import make_reward_model

    tok = AutoTokenizer.from_pretrained(toy_world.path)
    train = _ranked_examples(toy_world.task, 64, seed=3, k=3)
    held = _ranked_examples(toy_world.task, 24, seed=4, k=3)
    pm = make_reward_model(toy_world.path, tok)
    metrics = train_preference_model(pm, tok, train, held, PreferenceModelConfig(epochs=2, lr=1e-3))
    assert metrics["eval_accuracy"] > 0.7, metrics
    p = [h.prompt for h in held[:4]]
    a = [h.responses[0] for h in held[:4]]
    b = [h.responses[1] for h in held[:4]]
    pab, pba = preference_probs(pm, tok, p, a, b), preference_probs(pm, tok, p, b, a)
    assert torch.allclose(pab + pba, torch.ones(4), atol=1e-5)
