"""DRO-V (survey 3.6.2, eq. 37-39): the two losses against hand values and an independent float64
reference of the gradients, the value network's V(x) reads the prompt only, data conversion,
and a CI-sized toy-world run where the programmatic reward rises significantly (paired
one-sided t-test on held-out prompts, same sampling seed before and after)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignflow.trainers.encoding import make_token_batch
from alignflow.trainers.online.dro_v import (
    DROVConfig,
    Trajectory,
    ValueNetwork,
    dro_policy_loss,
    dro_value_loss,
    prompt_value,
    trajectories_from_rows,
    unique_prompts,
)


def test_losses_closed_form():
    """r=1, V=0.2, beta=0.5, log ratio -0.5: residual 1 - 0.2 + 0.25 = 1.05, eq. 37 = 0.55125."""
    logps = torch.tensor([-3.0], requires_grad=True)
    ref = torch.tensor([-2.5])
    value = torch.tensor([0.2], requires_grad=True)
    r = torch.tensor([1.0])
    pl = dro_policy_loss(logps, ref, value, r, beta=0.5)
    vl = dro_value_loss(value, logps, ref, r, beta=0.5)
    assert pl.item() == pytest.approx(0.55125 / 0.5)
    assert vl.item() == pytest.approx(0.55125)
    (pl + vl).sum().backward()
    # eq. 38 in log pi: -(r - V) + beta * log ratio = -0.8 - 0.25; eq. 39 in V: V - r + beta * log ratio
    assert logps.grad.item() == pytest.approx(-1.05)
    assert value.grad.item() == pytest.approx(0.2 - 1.0 - 0.25)


def test_gradients_match_float64_reference():
    """Autograd gradients of both losses == eq. 38 / eq. 39 written out in numpy float64, and each
    loss reaches only its own network (policy loss: V fixed; value loss: log-ratio fixed)."""
    rng = np.random.default_rng(0)
    n, beta = 7, 0.3
    lp, rf, v, r = (rng.normal(size=n) for _ in range(4))
    logps = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    value = torch.tensor(v, dtype=torch.float64, requires_grad=True)
    ref, reward = torch.tensor(rf, dtype=torch.float64), torch.tensor(r, dtype=torch.float64)

    dro_policy_loss(logps, ref, value, reward, beta).sum().backward()
    assert value.grad is None
    np.testing.assert_allclose(logps.grad.numpy(), -(r - v) + beta * (lp - rf), rtol=1e-12)  # eq. 38

    logps.grad = None
    dro_value_loss(value, logps, ref, reward, beta).sum().backward()
    assert logps.grad is None
    np.testing.assert_allclose(value.grad.numpy(), v - r + beta * (lp - rf), rtol=1e-12)  # eq. 39
    # the value of eq. 37 itself
    np.testing.assert_allclose(dro_value_loss(value, logps, ref, reward, beta).detach().numpy(),
                               0.5 * (r - v - beta * (lp - rf)) ** 2, rtol=1e-12)


def test_multi_output_value_loss_respects_mask():
    value = torch.tensor([[0.0, 1.0, 5.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    zeros = torch.zeros(2, dtype=torch.float64)
    out = dro_value_loss(value, zeros, zeros, torch.tensor([1.0, 1.0], dtype=torch.float64), beta=1.0, mask=mask)
    np.testing.assert_allclose(out.numpy(), [(0.5 * 1 + 0.5 * 0) / 2, 0.5 * 1.0])


def test_prompt_value_reads_the_last_prompt_token():
    batch = make_token_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    values = torch.arange(4.0).repeat(2, 1)  # [B, T-1] (widths 5 and 4 -> T = 5): column t = t
    # first response action column = len(prompt) - 1
    assert prompt_value(values, batch.action_mask).tolist() == [2.0, 0.0]


@pytest.fixture(scope="module")
def world(toy_world):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # 2 shared cores: one thread avoids oversubscription
    return toy_world, AutoTokenizer.from_pretrained(toy_world.path)


def _policy(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_value_network_sees_only_the_prompt(world):
    """V(x) is causal in the response: the same prompt with different responses gets the same V."""
    from alignflow.trainers.online.dro_v import encode

    toy, tok = world
    net = ValueNetwork.from_policy(_policy(toy.path))
    torch.nn.init.normal_(net.head.weight, std=0.1)  # a non-flat head, so the check means something
    prompt = [{"role": "user", "content": "Spell out: 12"}]
    rows = [Trajectory(prompt, "twelve", 1.0), Trajectory(prompt, "eleven and more", 0.0)]
    batch = encode(tok, rows)
    with torch.no_grad():
        v = prompt_value(net(batch), batch.action_mask)
    assert torch.allclose(v[0], v[1], atol=1e-5)
    # the prompt-only pass (each distinct prompt once) gives the same V(x)
    other = [{"role": "user", "content": "Spell out: 907"}]
    with torch.no_grad():
        alone = net.prompt_values(tok, [prompt, other, prompt])
        full = prompt_value(net(encode(tok, [Trajectory(other, "x", 0.0)])), encode(tok, [Trajectory(other, "x", 0.0)]).action_mask)
    torch.testing.assert_close(alone, torch.stack([v[0], full[0], v[0]]), atol=1e-5, rtol=1e-5)


def test_rows_to_trajectories():
    rows = [{"prompt": "a", "response": "x", "label": True}, {"prompt": "b", "response": "y", "label": False},
            {"prompt": "c", "response": "z", "label": False, "reward": 0.25}]
    got = trajectories_from_rows(rows)
    assert [t.reward for t in got] == [1.0, -1.0, 0.25]
    assert got[0].prompt == [{"role": "user", "content": "a"}]
    twice = trajectories_from_rows(rows + [{"prompt": "a", "response": "w", "reward": 0.5}])
    assert [p[0]["content"] for p in unique_prompts(twice)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="row 0"):
        trajectories_from_rows([{"prompt": "a", "response": "x"}])


def test_offline_trajectories_without_generator(world):
    """Offline DRO on a given scored dataset: no generator, no evaluation, the policy moves."""
    from alignflow.trainers.online.dro_v import train_dro_v

    toy, tok = world
    policy = _policy(toy.path)
    before = [p.detach().clone() for p in policy.parameters()]
    prompts = toy.task.prompts(4, seed=3)
    data = [Trajectory([{"role": "user", "content": p}], toy.task.reference(p), 1.0) for p in prompts]
    data += [Trajectory([{"role": "user", "content": p}], "zzz", -1.0) for p in prompts]
    _, value_net, report = train_dro_v(policy, tok, DROVConfig(beta=0.5, epochs=1, batch_size=4), trajectories=data)
    assert len(report.history) == 2 and report.extra["trajectories"] == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert report.generations == 0 and report.judge_calls == 0
    with pytest.raises(ValueError, match="needs trajectories"):
        train_dro_v(policy, tok, DROVConfig())


def test_cli_train_loss_dro_on_a_binary_dataset(world, tmp_path):
    """``alignflow train DATA --loss dro``: offline DRO-V on a binary dataset with a reward column
    (policy + value network written); a pairwise dataset is refused in one line."""
    import pyarrow as pa
    from typer.testing import CliRunner

    from alignflow.flows.cli import app
    from alignflow.schemas.kinds import schema_for
    from alignflow.schemas.store import write_dataset

    toy, _ = world
    prompts = toy.task.prompts(4, seed=5)
    rows = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": p}], "response": resp, "label": good,
             "reward": float(good)} for i, p in enumerate(prompts)
            for resp, good in ((toy.task.reference(p), True), ("zz", False))]
    data = write_dataset(tmp_path / "bin", pa.Table.from_pylist(
        rows, schema=schema_for("binary").append(pa.field("reward", pa.float64()))), "binary")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["train", str(data), "--model", str(toy.path), "--loss", "dro", "--param",
                                   "beta=0.5", "--output", str(out), "--num_train_epochs", "1",
                                   "--per_device_train_batch_size", "4"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").exists() and (out / "value_network.pt").exists()
    assert "DRO-V on 8 scored responses" in res.output

    pairs = write_dataset(tmp_path / "pw", pa.Table.from_pylist(
        [{"prompt_id": "0", "prompt": [{"role": "user", "content": "a"}], "chosen": "x", "rejected": "y"}],
        schema=schema_for("pairwise")), "pairwise")
    res = CliRunner().invoke(app, ["train", str(pairs), "--model", str(toy.path), "--loss", "dro", "--output",
                                   str(tmp_path / "o2")])
    assert res.exit_code == 2 and "binary data" in res.output


@pytest.mark.slow
def test_dro_v_raises_toy_reward(world):
    """Offline DRO-V: 64 prompts x 4 single samples of the SFT policy, each scored once by the
    toy reward, 4 epochs; the held-out reward (64 prompts) rises significantly."""
    from scipy.stats import ttest_rel

    from alignflow.flows.online import policy_generator_factory, toy_reward
    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.encoding import as_messages
    from alignflow.trainers.online.dro_v import train_dro_v

    toy, tok = world
    reward = toy_reward(toy.task)
    prompts = [as_messages(p) for p in toy.task.prompts(64, seed=11)]
    eval_prompts = [as_messages(p) for p in toy.task.prompts(64, seed=12)]
    cfg = DROVConfig(beta=0.03, epochs=4, batch_size=16, lr=3e-4, prompts_per_round=64, k=4,
                     sampling=SamplingParams(temperature=1.0, max_new_tokens=24))
    _, value_net, report = train_dro_v(_policy(toy.path), tok, cfg, prompts=prompts,
                                       make_generator=policy_generator_factory("cpu"), reward_fn=reward,
                                       eval_prompts=eval_prompts)
    before, after = report.extra["eval_rewards_before"], report.extra["eval_rewards_after"]
    p = ttest_rel(after, before, alternative="greater").pvalue
    assert report.reward_after > report.reward_before and p < 0.05, (report.reward_before, report.reward_after, p)
    assert report.generations == 256 and report.judge_calls == 256  # one score per single trajectory
    assert value_net.head.weight.abs().sum() > 0  # the value network learned
