"""Unit tests of the online methods' formulas against hand computations (fast, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.trainers.online.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalized_rewards,
    last_action_index,
    masked_mean,
    masked_whiten,
)
from alignflow.trainers.online.rloo import leave_one_out_advantages, rloo_loss


def test_gae_matches_hand_computation():
    # One row: prompt column 0 (masked out), response actions at columns 1..3, padding column 4.
    mask = torch.tensor([[False, True, True, True, False]])
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 7.0]])  # off-mask entries must be ignored
    values = torch.tensor([[5.0, 0.5, 0.4, 0.3, 5.0]])
    g, lam = 0.9, 0.8
    # hand: V_after_end = 0
    d3 = 1.0 + g * 0.0 - 0.3
    d2 = -0.2 + g * 0.3 - 0.4
    d1 = 0.1 + g * 0.4 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    adv, ret = gae(rewards, values, mask, gamma=g, lam=lam)
    expected = torch.tensor([[0.0, a1, a2, a3, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, expected + torch.tensor([[0.0, 0.5, 0.4, 0.3, 0.0]]), atol=1e-6)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False  # second row ends one action earlier
    rewards = torch.randn(2, 4, dtype=torch.float64)
    values = torch.randn(2, 4, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = rewards * mask
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(adv[mask], (to_go - values)[mask])
    assert torch.allclose(ret[mask], to_go[mask])
    assert adv[1, 3] == 0


def test_kl_penalized_rewards_put_score_on_last_response_token():
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [-2.0, -1.0, -0.5, -1.0]])
    scores = torch.tensor([3.0, -1.0])
    rewards, kl = kl_penalized_rewards(scores, logps, ref, mask, beta=0.1)
    assert torch.allclose(kl, torch.tensor([[0.0, 0.5, -1.0, 0.0], [1.0, 0.0, -0.5, 0.0]]))
    expected = torch.tensor([[0.0, -0.05, 0.1 + 3.0, 0.0], [-0.1, 0.0, 0.05, -1.0]])
    assert torch.allclose(rewards, expected)
    assert last_action_index(mask).tolist() == [2, 3]


def test_clipped_policy_loss_by_hand():
    mask = torch.tensor([[True, True, True, False]])
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 9.0]]))  # ratios 1.5, 0.5, 1.1, (masked)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    loss, stats = clipped_policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 1: A>0, ratio 1.5 -> clipped 1.2 -> max(-1.5, -1.2) = -1.2
    # token 2: A>0, ratio 0.5 -> max(-0.5, -0.8) = -0.5 (pessimistic: unclipped)
    # token 3: A<0, ratio 1.1 inside the band -> 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    # gradient: zero for the clipped token, non-zero otherwise
    new = new.clone().requires_grad_(True)
    clipped_policy_loss(new, old, adv, mask, 0.2)[0].backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] != 0 and new.grad[0, 2] != 0 and new.grad[0, 3] == 0


def test_clipped_value_loss_by_hand():
    mask = torch.tensor([[True, True]])
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0]])
    loss = clipped_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 1: max((1-2)^2, (0.2-2)^2) = 3.24 ; token 2: max(0.81, (0.1-1)^2 = 0.81) = 0.81
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.81) / 2, abs=1e-6)


def test_masked_mean_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    w = masked_whiten(x, mask)
    assert w[mask].mean().abs() < 1e-6 and w[mask].std(unbiased=False) == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask] == 0).all()


def test_leave_one_out_baseline():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    adv = leave_one_out_advantages(r)
    # A_1 = 1 - (2+3+6)/3 etc.
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]])
    assert torch.allclose(adv, expected)
    # equals K/(K-1) * (r - mean)
    assert torch.allclose(adv, 4 / 3 * (r - r.mean()))
    with pytest.raises(ValueError):
        leave_one_out_advantages(torch.ones(1, 1))


def test_rloo_loss_gradient_is_eq48():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = leave_one_out_advantages(torch.tensor([[1.0, 0.0, 0.5]]))
    rloo_loss(logps, adv).backward()
    # d/d logp_i of -(1/K) sum A_i logp_i = -A_i / K (B = 1)
    assert torch.allclose(logps.grad, -adv / 3)


def test_binomial_termination_rule():
    from alignflow.trainers.online.termination import should_stop, winrate_test

    strong = winrate_test(wins=40, losses=10, ties=0, alpha=0.05)
    assert strong["significant"] and strong["p_value"] < 0.001
    weak = winrate_test(wins=26, losses=24, ties=0, alpha=0.05)
    assert not weak["significant"]
    # ties count half a win each (split evenly): 10 ties + 15-15 is no evidence
    tied = winrate_test(wins=15, losses=15, ties=10, alpha=0.05)
    assert tied["win_rate"] == pytest.approx(0.5) and not tied["significant"]
    stop, why = should_stop(weak, reward_history=[0.1, 0.2, 0.3])
    assert stop and "win-rate" in why
    stop, why = should_stop(strong, reward_history=[0.1, 0.3, 0.29])
    assert stop and "reward" in why
    stop, _ = should_stop(strong, reward_history=[0.1, 0.2, 0.3])
    assert not stop
    assert math.isfinite(strong["p_value"])


def test_ptx_loss_is_the_mean_token_nll_of_the_text():
    """PPO-ptx's gamma term (eq. 2): mean over the real tokens (padding excluded, the first token
    has no prediction) of -log pi(token | previous tokens), here summed by hand in float64."""
    from alignflow.trainers.online.ppo import ptx_loss
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    tok = make_char_tokenizer()
    model = make_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2, seed=3).eval()
    texts = ["Spell out: 42 forty-two", "abc"]
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    total, count = 0.0, 0
    for row in ids:  # each text alone, no padding at all
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([row])).logits[0].double(), -1)
        for t in range(1, len(row)):
            total -= float(logp[t - 1, row[t]])
            count += 1
    with torch.no_grad():
        got = ptx_loss(model, input_ids, attention)
    assert count == sum(len(x) - 1 for x in ids)
    assert float(got) == pytest.approx(total / count, rel=1e-5)


def test_value_head_gae_by_hand():
    """The rollout path of PPO on one row: the value head on hidden states, the KL-penalised
    token rewards with the score on the last action, then GAE (gamma 0.9, lambda 0.5)."""
    from alignflow.trainers.online.ppo import ValueHead

    head = ValueHead(2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.linear.bias.fill_(0.5)
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]])  # [1, 5, 2]
    mask = torch.tensor([[False, True, True, True, False]])  # prompt action, 3 response actions, padding
    values = head(hidden) * mask  # V = h0 - h1 + 0.5 -> [_, 1.5, -0.5, 1.5, _]
    assert values.tolist() == [[0.0, 1.5, -0.5, 1.5, 0.0]]
    logps = torch.tensor([[-1.0, -0.5, -1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    rewards, _ = kl_penalized_rewards(torch.tensor([2.0]), logps, ref, mask, beta=0.2)
    # R = -0.2 * (logp - ref) on response actions, + score 2 on the last: [_, -0.1, 0, 0.2 + 2, _]
    assert torch.allclose(rewards[mask], torch.tensor([-0.1, 0.0, 2.2]))
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d3 = 2.2 + 0.9 * 0.0 - 1.5  # the episode ends after the last action: V_T = 0
    d2 = 0.0 + 0.9 * 1.5 - (-0.5)
    d1 = -0.1 + 0.9 * -0.5 - 1.5
    a3 = d3
    a2 = d2 + 0.45 * a3
    a1 = d1 + 0.45 * a2
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 1.5, a2 - 0.5, a3 + 1.5, 0.0]]), atol=1e-6)
