"""Resume of the online trainers: a run killed (or stopped) mid-way and called again with the
same checkpoint folder, config and prompts continues from its newest checkpoint and ends where
an uninterrupted run ends (same weights, same record, same spend)."""

from __future__ import annotations

import json

import pytest
import torch

from alignflow.schemas.generator import SamplingParams
from alignflow.trainers.online import checkpointing as ck
from tests.test_online import toy_env

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=12)


# --------------------------------------------------------------------------------------------
# Checkpoint files (no model)
# --------------------------------------------------------------------------------------------
def test_checkpoints_atomic_newest_and_pruned(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 0.1
        steps: int = 3

    fp = ck.run_fingerprint(Cfg(), ["a"])
    assert fp == ck.run_fingerprint(Cfg(steps=9), ["a"])  # extending a run is the same run
    assert fp != ck.run_fingerprint(Cfg(lr=0.2), ["a"]) != ck.run_fingerprint(Cfg(), ["b"])
    for i in (1, 2, 3):
        ck.save_checkpoint(tmp_path, ck.checkpoint_name(i), {"w": torch.full((2,), float(i))},
                           {"index": i, "fingerprint": fp}, files={"note.txt": f"step {i}"})
    (tmp_path / ".step-000004.tmp-1").mkdir()  # a save killed before its rename: ignored
    newest = ck.latest_checkpoint(tmp_path)
    assert newest.name == "step-000003"
    state, meta = ck.load_checkpoint(newest, fp)
    assert state["w"].tolist() == [3.0, 3.0] and meta["index"] == 3
    # older checkpoints keep their record, not their weights
    assert not (tmp_path / "step-000001" / ck.CHECKPOINT_STATE).exists()
    assert (tmp_path / "step-000001" / "note.txt").read_text() == "step 1"
    with pytest.raises(ValueError, match="different config"):
        ck.load_checkpoint(newest, ck.run_fingerprint(Cfg(lr=0.2), ["a"]))
    assert ck.latest_checkpoint(tmp_path / "absent") is None and ck.find_resume(None, fp) == (None, None)


# --------------------------------------------------------------------------------------------
# Trainers on the toy world
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(toy_world):
    torch.set_num_threads(1)  # bitwise-equal runs, and no oversubscription on shared cores
    return toy_env(toy_world, n_prompts=16, n_eval=8, seed=21)


class Killed(RuntimeError):
    pass


def crashing(reward_fn, after_calls: int):
    """The reward function of a run that dies on its ``after_calls + 1``-th scoring call."""
    calls = {"n": 0}

    def fn(prompts, responses):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Killed("run killed")
        return reward_fn(prompts, responses)

    return fn


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_rloo_killed_mid_run_resumes_to_the_same_result(env, tmp_path):
    from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

    cfg = RLOOConfig(steps=3, prompts_per_step=4, k=2, lr=3e-4, beta=0.05, sampling=SAMPLING, checkpoint_every=1)
    kw = dict(eval_prompts=env.eval_prompts, eval_reward_fn=env.reward)
    whole, rep_whole = train_rloo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg, **kw)

    ckpt = tmp_path / "rloo"
    with pytest.raises(Killed):  # dies while scoring step 3's samples
        train_rloo(env.policy(), env.tok, env.prompts, env.make_gen, crashing(env.reward, 2), cfg,
                   checkpoint_dir=ckpt, **kw)
    assert ck.latest_checkpoint(ckpt).name == "step-000002"
    resumed, rep = train_rloo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg,
                              checkpoint_dir=ckpt, **kw)
    assert rep.extra["resumed_from"].endswith("step-000002")
    assert_same_weights(whole, resumed)
    assert [h["reward"] for h in rep.history] == [h["reward"] for h in rep_whole.history]
    assert rep.reward_after == rep_whole.reward_after and rep.reward_before == rep_whole.reward_before
    assert (rep.generations, rep.judge_calls) == (rep_whole.generations, rep_whole.judge_calls) == (24, 24)


def test_ppo_extended_run_equals_one_long_run(env, tmp_path):
    """PPO for 2 steps (checkpoint at the end), then the same run asked for 3 steps resumes at
    step 3; policy, value head and record equal a 3-step run's."""
    from alignflow.trainers.online.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(steps=3, prompts_per_step=4, samples_per_prompt=2, lr=3e-4, beta=0.05, sampling=SAMPLING)
    kw = dict(eval_prompts=env.eval_prompts)
    whole, head_whole, rep_whole = train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg, **kw)

    ckpt = tmp_path / "ppo"
    short = PPOConfig(**{**cfg.__dict__, "steps": 2})
    train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, short, checkpoint_dir=ckpt, **kw)
    resumed, head, rep = train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg,
                                   checkpoint_dir=ckpt, **kw)
    assert_same_weights(whole, resumed)
    assert_same_weights(head_whole, head)
    assert [h["step"] for h in rep.history] == [0, 1, 2]
    assert [h["reward"] for h in rep.history] == [h["reward"] for h in rep_whole.history]
    assert rep.generations == rep_whole.generations == 24
    with pytest.raises(ValueError, match="different config"):  # same folder, another run
        train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward,
                  PPOConfig(**{**cfg.__dict__, "lr": 1e-3}), checkpoint_dir=ckpt, **kw)


def test_iterative_rounds_resume(env, tmp_path):
    """Iterative DPO: 1 round, then the same run asked for 2 rounds skips round 1 and ends with
    the weights of a 2-round run; every round's pairs are kept, only the newest weights; a
    third call with nothing left to do trains nothing."""
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    cfg = IterativeConfig(method="iterative-dpo", rounds=2, prompts_per_round=6, k=2, epochs=1, batch_size=6,
                          lr=3e-4, terminate=False, sampling=SAMPLING)
    kw = dict(reward_fn=env.reward, eval_prompts=env.eval_prompts)
    whole, rep_whole = train_iterative(env.policy(), env.tok, env.prompts, env.make_gen, cfg, **kw)

    ckpt = tmp_path / "idpo"
    one = IterativeConfig(**{**cfg.__dict__, "rounds": 1})
    _, rep1 = train_iterative(env.policy(), env.tok, env.prompts, env.make_gen, one, checkpoint_dir=ckpt, **kw)
    assert rep1.generations == 12
    resumed, rep = train_iterative(env.policy(), env.tok, env.prompts, env.make_gen, cfg, checkpoint_dir=ckpt, **kw)
    assert rep.extra["resumed_from"].endswith("round-000001")
    assert_same_weights(whole, resumed)
    assert [(h["round"], h["pairs"], h["reward"]) for h in rep.history] == \
        [(h["round"], h["pairs"], h["reward"]) for h in rep_whole.history]
    assert rep.generations == rep_whole.generations == 24 and rep.reward_after == rep_whole.reward_after
    rounds = sorted(p.name for p in ckpt.iterdir())
    assert rounds == ["round-000001", "round-000002"]
    assert not (ckpt / "round-000001" / ck.CHECKPOINT_STATE).exists()
    pairs = [json.loads(line) for line in (ckpt / "round-000002" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == rep.history[-1]["pairs"] and {"prompt", "chosen", "rejected"} <= set(pairs[0])

    again, rep3 = train_iterative(env.policy(), env.tok, env.prompts, env.make_gen, cfg, checkpoint_dir=ckpt, **kw)
    assert_same_weights(whole, again)
    assert rep3.generations == 24 and len(rep3.history) == 2


def test_run_online_resumes_into_the_same_output(toy_world, tmp_path):
    """The flow checkpoints into OUTPUT/checkpoints: the same config run again into the same
    folder (here asked for one more step) resumes; another config is refused in one line."""
    from alignflow.flows.online import run_online

    base = {"method": "rloo", "model": str(toy_world.path), "output": str(tmp_path / "run"), "num_prompts": 8,
            "num_eval_prompts": 4, "params": {"steps": 2, "prompts_per_step": 4, "k": 2, "checkpoint_every": 1}}
    first = run_online(base)
    assert first["extra"].get("resumed_from") is None and first["generations"] == 16
    more = run_online({**base, "params": {**base["params"], "steps": 3}})
    assert more["extra"]["resumed_from"].endswith("step-000002")
    assert [h["step"] for h in more["history"]] == [0, 1, 2] and more["generations"] == 24
    assert more["reward_before"] == first["reward_before"]
    with pytest.raises(ValueError, match="different config"):
        run_online({**base, "params": {**base["params"], "k": 4}})


def test_dro_v_killed_mid_epoch_resumes_to_the_same_result(env, tmp_path, monkeypatch):
    """DRO-V collects its single trajectories once, checkpoints after every epoch (with the
    collected samples); killed in epoch 2, the same call resumes there without re-sampling."""
    import alignflow.trainers.online.dro_v as dv

    cfg = dv.DROVConfig(beta=0.1, epochs=2, batch_size=8, lr=3e-4, prompts_per_round=8, k=2, sampling=SAMPLING)
    kw = dict(prompts=env.prompts, make_generator=env.make_gen, reward_fn=env.reward, eval_prompts=env.eval_prompts)
    whole, v_whole, rep_whole = dv.train_dro_v(env.policy(), env.tok, cfg, **kw)

    real, calls = dv.dro_policy_loss, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the first step of epoch 2
            raise Killed("run killed")
        return real(*a, **k)

    ckpt = tmp_path / "drov"
    monkeypatch.setattr(dv, "dro_policy_loss", dying)
    with pytest.raises(Killed):
        dv.train_dro_v(env.policy(), env.tok, cfg, checkpoint_dir=ckpt, **kw)
    monkeypatch.setattr(dv, "dro_policy_loss", real)
    assert ck.latest_checkpoint(ckpt).name == "epoch-000001"
    resumed, v, rep = dv.train_dro_v(env.policy(), env.tok, cfg, checkpoint_dir=ckpt, **kw)
    assert rep.extra["resumed_from"].endswith("epoch-000001")
    assert_same_weights(whole, resumed)
    assert_same_weights(v_whole, v)
    assert [h["dro_loss"] for h in rep.history] == [h["dro_loss"] for h in rep_whole.history]
    assert rep.generations == rep_whole.generations == 16 and rep.reward_after == rep_whole.reward_after


def test_nash_md_killed_mid_run_resumes_to_the_same_result(env, tmp_path):
    """Nash-MD checkpoints every step; killed while judging step 3, the same call resumes after
    step 2 and ends with the weights, record and spend of an uninterrupted run."""
    from alignflow.flows.online import RewardPreference
    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

    preference = RewardPreference(env.reward, scale=0.1)
    cfg = NashMDConfig(steps=3, prompts_per_step=4, lr=3e-4, sampling=SAMPLING, checkpoint_every=1)
    kw = dict(eval_prompts=env.eval_prompts, eval_reward_fn=env.reward)
    whole, rep_whole = train_nash_md(env.policy(), env.tok, env.prompts, env.make_gen, preference, cfg, **kw)

    ckpt = tmp_path / "nash"
    calls = {"n": 0}

    def dying(*args):  # the preference oracle of a run that dies on its third call (step 3)
        calls["n"] += 1
        if calls["n"] > 2:
            raise Killed("run killed")
        return preference(*args)

    with pytest.raises(Killed):
        train_nash_md(env.policy(), env.tok, env.prompts, env.make_gen, dying, cfg, checkpoint_dir=ckpt, **kw)
    assert ck.latest_checkpoint(ckpt).name == "step-000002"
    resumed, rep = train_nash_md(env.policy(), env.tok, env.prompts, env.make_gen, preference, cfg,
                                 checkpoint_dir=ckpt, **kw)
    assert rep.extra["resumed_from"].endswith("step-000002")
    assert_same_weights(whole, resumed)
    assert [h["step"] for h in rep.history] == [0, 1, 2]
    assert [(h["preference_vs_mixture"], h["kl"]) for h in rep.history] == \
        [(h["preference_vs_mixture"], h["kl"]) for h in rep_whole.history]
    assert rep.reward_before == rep_whole.reward_before and rep.reward_after == rep_whole.reward_after
    # 4 policy samples + 4 mixture samples per step; one preference call per pair
    assert (rep.generations, rep.judge_calls) == (rep_whole.generations, rep_whole.judge_calls) == (24, 12)


def test_paft_extended_run_equals_one_long_run(env, tmp_path):
    """PAFT: 1 round (merged weights checkpointed), then the same run asked for 2 rounds skips
    round 1 and ends with a 2-round run's merged weights and record; another config is refused."""
    from alignflow.trainers.online.paft import PAFTConfig, train_paft

    cfg = PAFTConfig(rounds=2, prompts_per_round=6, k=2, epochs=1, batch_size=6, lr=1e-3, lora_r=4,
                     sampling=SAMPLING)
    kw = dict(eval_prompts=env.eval_prompts)
    whole, rep_whole = train_paft(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg, **kw)

    ckpt = tmp_path / "paft"
    one = PAFTConfig(**{**cfg.__dict__, "rounds": 1})
    _, rep1 = train_paft(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, one, checkpoint_dir=ckpt, **kw)
    assert rep1.generations == 12 and ck.latest_checkpoint(ckpt).name == "round-000001"
    resumed, rep = train_paft(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg,
                              checkpoint_dir=ckpt, **kw)
    assert rep.extra["resumed_from"].endswith("round-000001")
    assert type(resumed).__name__ == "LlamaForCausalLM"  # plain merged weights, no adapters left
    assert_same_weights(whole, resumed)
    assert [(h["round"], h["pairs"], h["dpo_loss"]) for h in rep.history] == \
        [(h["round"], h["pairs"], h["dpo_loss"]) for h in rep_whole.history]
    assert rep.reward_after == rep_whole.reward_after and rep.generations == rep_whole.generations == 24
    assert sorted(p.name for p in ckpt.iterdir()) == ["round-000001", "round-000002"]
    with pytest.raises(ValueError, match="different config"):
        train_paft(env.policy(), env.tok, env.prompts, env.make_gen, env.reward,
                   PAFTConfig(**{**cfg.__dict__, "lr": 3e-3}), checkpoint_dir=ckpt, **kw)


@pytest.mark.parametrize("method,params,grow,name", [
    ("nash-md", {"steps": 1, "prompts_per_step": 4, "checkpoint_every": 1}, {"steps": 2}, "step-000001"),
    ("paft", {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1, "batch_size": 4}, {"rounds": 2},
     "round-000001"),
])
def test_run_online_resumes_nash_md_and_paft(toy_world, tmp_path, method, params, grow, name):
    """The flow hands Nash-MD and PAFT their OUTPUT/checkpoints folder: a longer run of the same
    config into the same output resumes after the first run's last checkpoint."""
    from alignflow.flows.online import run_online

    base = {"method": method, "model": str(toy_world.path), "output": str(tmp_path / "run"), "num_prompts": 8,
            "num_eval_prompts": 4, "max_new_tokens": 8, "params": params}
    first = run_online(base)
    assert first["extra"].get("resumed_from") is None
    assert (tmp_path / "run" / "checkpoints" / name / ck.CHECKPOINT_STATE).exists()
    more = run_online({**base, "params": {**params, **grow}})
    assert more["extra"]["resumed_from"].endswith(name)
    assert len(more["history"]) == 2 and more["history"][0] == first["history"][0]
    assert more["generations"] == 2 * first["generations"] and more["reward_before"] == first["reward_before"]
