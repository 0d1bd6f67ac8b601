"""Device and dtype plumbing of the online trainers, checked on the CPU.

The trainers put every tensor they build for a model on that model's device
(``rollout.device_of``); the CUDA runs themselves are in tests/test_gpu.py (marked ``gpu``).
Here: the helpers, and one RLOO / PPO step with a float64 policy (a dtype the code must not
assume away: float32 rewards meet float64 log-probs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignflow.schemas.generator import SamplingParams
from alignflow.trainers import encoding, modeling
from alignflow.trainers.online import rollout as ro

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=8)


def test_device_of_and_token_batch_to():
    lin = torch.nn.Linear(2, 1)
    assert modeling.device_of(lin) == torch.device("cpu")
    assert modeling.device_of(torch.nn.Module()) == torch.device("cpu")  # no parameters: the host
    batch = encoding.make_token_batch([[5, 6], [7]], [[8], [9, 10]], pad_id=0)
    moved = batch.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip((moved.input_ids, moved.attention_mask, moved.action_mask),
                                                  (batch.input_ids, batch.attention_mask, batch.action_mask)))
    assert moved.input_ids.data_ptr() == batch.input_ids.data_ptr()  # already there: no copy
    meta = batch.to("meta")
    assert meta.input_ids.device.type == meta.action_mask.device.type == "meta"
    assert meta.action_mask.dtype == torch.bool and meta.input_ids.shape == (2, 3)


def test_colocate_follows_the_policy():
    """A reference or value head built before the generator factory moved the policy follows it
    (the module itself, moved in place; CPU -> CUDA keeps the parameter objects, which the CUDA
    test of the flow's case checks through the optimizer)."""
    policy = torch.nn.Linear(2, 2, device="meta")  # stands in for a policy on another device
    head = torch.nn.Linear(2, 1)
    assert modeling.colocate(head, policy) is head and head.weight.device.type == "meta"
    assert modeling.colocate(head, policy) is head  # already there: nothing to do


@pytest.mark.parametrize("returned", [
    lambda n: [0.5] * n, lambda n: np.full(n, 0.5), lambda n: torch.full((n,), 0.5, dtype=torch.float64),
])
def test_score_accepts_lists_arrays_and_tensors(returned):
    spend = ro.Spend()
    got = ro.score(lambda p, r: returned(len(r)), [[]] * 3, ["a", "b", "c"], spend)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.tolist() == [0.5] * 3
    assert spend.judge_calls == 3
    assert ro.score(lambda p, r: returned(len(r)), [[]] * 3, ["a", "b", "c"], device="meta").device.type == "meta"


@pytest.fixture(scope="module")
def tiny():
    from alignflow.flows.online import policy_generator_factory
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    torch.set_num_threads(1)
    tok = make_char_tokenizer()
    prompts = [encoding.as_messages(f"Write in capitals: {w}") for w in ("abc", "de", "fgh", "ij")]
    return tok, lambda: make_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0).double(), \
        policy_generator_factory("cpu"), prompts


def ranked_reward(prompts, responses):
    """Distinct rewards within every prompt's samples, as a float32 tensor: non-zero advantages."""
    return torch.arange(len(responses), dtype=torch.float32) / len(responses)


def test_rloo_step_with_a_float64_policy(tiny):
    from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

    tok, make_policy, make_gen, prompts = tiny
    policy = make_policy()
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = RLOOConfig(steps=1, prompts_per_step=2, k=2, lr=1e-3, beta=0.05, sampling=SAMPLING)
    out, report = train_rloo(policy, tok, prompts, make_gen, ranked_reward, cfg, eval_prompts=prompts[:2])
    assert np.isfinite(report.history[0]["loss"]) and np.isfinite(report.kl_to_ref)
    assert next(out.parameters()).dtype == torch.float64
    assert any(not torch.equal(a, b) for a, b in zip(before, out.parameters()))


def test_ppo_step_with_a_float64_policy(tiny):
    from alignflow.trainers.online.ppo import PPOConfig, train_ppo

    tok, make_policy, make_gen, prompts = tiny
    policy = make_policy()
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = PPOConfig(steps=1, prompts_per_step=2, samples_per_prompt=2, ppo_epochs=1, beta=0.1, ptx_coef=0.5,
                    lr=1e-3, sampling=SAMPLING)
    out, value_head, report = train_ppo(policy, tok, prompts, make_gen, ranked_reward, cfg,
                                        ptx_texts=["abc ABC", "de DE"], eval_prompts=prompts[:2])
    h = report.history[0]
    assert np.isfinite(h["policy_loss"]) and np.isfinite(h["value_loss"]) and np.isfinite(report.kl_to_ref)
    assert value_head.linear.weight.abs().sum() > 0  # the float32 head learned from float64 hidden states
    assert any(not torch.equal(a, b) for a, b in zip(before, out.parameters()))
