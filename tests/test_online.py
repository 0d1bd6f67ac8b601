"""Online methods on the toy world (RLOO and Nash-MD on the BPE world too): each must raise the
programmatic reward SIGNIFICANTLY over the starting (SFT) policy: held-out prompts, the same
sampling seed before and after (paired), one-sided paired t-test p < 0.05. Budgets are CI-sized
(a few rounds / steps)."""

from __future__ import annotations

import pytest
import torch

from alignflow.schemas.generator import SamplingParams

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=24)


def toy_env(toy_world, device: str = "cpu", n_prompts: int = 64, n_eval: int = 32, seed: int = 11):
    """What the online-trainer tests share (here, tests/test_online_resume.py, tests/test_gpu.py):
    an embedded world's (toy or BPE) tokenizer, a generator factory and fresh float32 policies on ``device``, the
    verifier reward and its preference, ``n_prompts`` training prompts (seed ``seed``) and
    ``n_eval`` held-out prompts (seed ``seed + 1``)."""
    from transformers import AutoTokenizer

    from alignflow.flows.online import RewardPreference, policy_generator_factory, toy_reward
    from alignflow.trainers.encoding import as_messages

    reward = toy_reward(toy_world.task)

    class Env:
        path = toy_world.path
        task = toy_world.task
        tok = AutoTokenizer.from_pretrained(toy_world.path)
        make_gen = staticmethod(policy_generator_factory(device))
        prompts = [as_messages(p) for p in toy_world.task.prompts(n_prompts, seed=seed)]
        eval_prompts = [as_messages(p) for p in toy_world.task.prompts(n_eval, seed=seed + 1)]

        @staticmethod
        def policy(dtype: torch.dtype = torch.float32):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(toy_world.path, dtype=dtype).to(device)

    Env.reward = reward
    Env.preference = RewardPreference(reward, scale=0.1)
    return Env


@pytest.fixture(scope="module")
def env(request):
    """The toy world's environment, or the named world's (indirect parameter "toy" / "bpe")."""
    torch.set_num_threads(2)
    return toy_env(request.getfixturevalue(f"{getattr(request, 'param', 'toy')}_world"))


def assert_significant_gain(report, alpha: float = 0.05):
    from scipy.stats import ttest_rel

    before, after = report.extra["eval_rewards_before"], report.extra["eval_rewards_after"]
    assert len(before) == len(after) > 0
    p = ttest_rel(after, before, alternative="greater").pvalue
    print(f"{report.method}: reward {report.reward_before:.3f} -> {report.reward_after:.3f}, one-sided paired p = {p:.2g}")
    assert report.reward_after > report.reward_before, report.to_dict()
    assert p < alpha, (p, report.reward_before, report.reward_after)
    assert report.generations > 0 and report.judge_calls > 0


def _iterative(env, method: str, **over):
    from alignflow.trainers.encoding import prompt_text_of
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    params = dict(rounds=2, prompts_per_round=32, k=4, epochs=2, batch_size=16, lr=3e-4, terminate=False,
                  sampling=SAMPLING)
    cfg = IterativeConfig(method=method, **{**params, **over})
    gold = {prompt_text_of(p): env.task.reference(prompt_text_of(p)) for p in env.prompts}
    return train_iterative(env.policy(), env.tok, env.prompts, env.make_gen, cfg, reward_fn=env.reward,
                           preference_fn=env.preference, judge_factory=lambda m, t: env.reward, gold=gold,
                           eval_prompts=env.eval_prompts, eval_reward_fn=env.reward)


@pytest.fixture(scope="module")
def iterative_dpo_run(env):
    return _iterative(env, "iterative-dpo")


@pytest.mark.slow
def test_iterative_dpo_raises_reward_with_reference_refresh(iterative_dpo_run):
    policy, report = iterative_dpo_run
    assert_significant_gain(report)
    assert [h["round"] for h in report.history] == [1, 2] and all(h["pairs"] > 0 for h in report.history)


@pytest.mark.slow
@pytest.mark.parametrize("env", ["toy", "bpe"], indirect=True)
def test_rloo_raises_reward(env):
    from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

    cfg = RLOOConfig(steps=10, prompts_per_step=16, k=4, lr=3e-4, beta=0.0, sampling=SAMPLING)
    _, report = train_rloo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg,
                           eval_prompts=env.eval_prompts)
    assert_significant_gain(report)


PPO_MATCHED = dict(steps=6, prompts_per_step=16, samples_per_prompt=2, lr=5e-4, sampling=SAMPLING)


def _ppo(env, **over):
    from alignflow.trainers.online.ppo import PPOConfig, train_ppo

    return train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, PPOConfig(**{**PPO_MATCHED, **over}),
                     eval_prompts=env.eval_prompts)


@pytest.fixture(scope="module")
def ppo_without_kl(env):
    return _ppo(env, beta=0.0)


@pytest.mark.slow
def test_ppo_raises_reward(ppo_without_kl):
    _, value_head, report = ppo_without_kl
    assert_significant_gain(report)
    assert value_head.linear.weight.abs().sum() > 0  # the value head learned


@pytest.mark.slow
def test_ppo_kl_penalty_keeps_the_policy_nearer_the_reference(env, ppo_without_kl):
    """Eq. 2's beta at matched steps: the same seeds, so both runs share the first rollout and
    update (the penalty is zero while policy == reference); from the second rollout on, the run
    with beta = 0.5 stays nearer the reference: lower rollout KL on average, and on the held-out
    prompts. Each rollout's KL is an estimate from 32 samples, so single rollouts may cross: on
    one CPU 0.58 / 0.91 / 0.99 / 1.17 against 0.79 / 1.11 / 1.29 / 2.03 nats (held-out 0.81
    against 2.20); on another 0.36 / 0.76 / 1.41 / 0.90 against 0.45 / 1.15 / 1.34 / 2.41."""
    _, _, free = ppo_without_kl
    _, _, penalised = _ppo(env, beta=0.5)
    kl_free, kl_pen = [h["kl"] for h in free.history], [h["kl"] for h in penalised.history]
    assert kl_free[:2] == pytest.approx(kl_pen[:2], abs=1e-4) and kl_free[0] == 0.0
    assert sum(kl_pen[2:]) < 0.85 * sum(kl_free[2:]), (kl_pen, kl_free)
    assert penalised.kl_to_ref < 0.7 * free.kl_to_ref, (penalised.kl_to_ref, free.kl_to_ref)


@pytest.mark.slow
def test_ppo_ptx_term_lowers_the_pretraining_nll(env):
    """PPO-ptx (eq. 2's gamma): two steps with gamma = 1 against the same two steps with gamma =
    1e-9 (the same seeds and the same pretraining batches drawn): the NLL of the pretraining text
    falls further only through the term."""
    from alignflow.trainers.encoding import make_token_batch
    from alignflow.trainers.online.ppo import PPOConfig, ptx_loss, train_ppo

    texts = [f"{p} {env.task.reference(p)}" for p in env.task.prompts(32, seed=5)]
    ids = [list(env.tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
    batch = make_token_batch([[]] * len(ids), ids, env.tok.pad_token_id)

    def nll(model):
        with torch.no_grad():
            return float(ptx_loss(model, batch.input_ids, batch.attention_mask))

    start = nll(env.policy())
    after = {}
    for gamma in (1e-9, 1.0):
        cfg = PPOConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, ptx_coef=gamma, beta=0.0, lr=1e-3,
                        sampling=SAMPLING)
        policy, _, _ = train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg,
                                 ptx_texts=texts, eval_prompts=env.eval_prompts[:4])
        after[gamma] = nll(policy)
    assert after[1.0] < after[1e-9] - 0.5, (start, after)  # measured 1.22 against 2.65 (start 2.71)
    with pytest.raises(ValueError):
        train_ppo(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, PPOConfig(ptx_coef=1.0))


@pytest.mark.slow
@pytest.mark.parametrize("method,over", [("sppo", {"beta": 0.2}), ("dno", {})])
def test_iterative_variants_raise_reward(env, method, over):
    _, report = _iterative(env, method, **over)
    assert_significant_gain(report)


@pytest.mark.slow
def test_self_rewarding_uses_the_live_model_as_judge(env):
    """Self-rewarding: the judge is rebuilt from the live policy each round (M1, M2).
    Here the factory's judge is the verifier: the test checks the rounds, that the factory saw
    the live model, and the gain. With the model's own rubric scores as the judge (after
    evaluation fine-tuning): tests/test_self_rewarding_rubric.py."""
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    seen = []

    def factory(model, tok):
        seen.append(model)
        return env.reward

    policy = env.policy()
    cfg = IterativeConfig(method="self-rewarding", rounds=2, prompts_per_round=32, k=4, epochs=2, batch_size=16,
                          lr=3e-4, terminate=False, sampling=SAMPLING)
    _, report = train_iterative(policy, env.tok, env.prompts, env.make_gen, cfg, judge_factory=factory,
                                eval_prompts=env.eval_prompts, eval_reward_fn=env.reward)
    assert len(seen) == 2 and all(m is policy for m in seen)
    assert_significant_gain(report)


@pytest.mark.slow
@pytest.mark.parametrize("env", ["toy", "bpe"], indirect=True)
def test_nash_md_raises_reward(env, request):
    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

    # the BPE world needs a few more steps for significance at 32 held-out prompts
    # (10 steps: 0.386 -> 0.464, p = 0.06; 15 steps: 0.386 -> 0.513, p = 0.018)
    steps = 15 if request.node.callspec.params["env"] == "bpe" else 10
    cfg = NashMDConfig(steps=steps, prompts_per_step=16, lr=3e-4, sampling=SAMPLING)
    _, report = train_nash_md(env.policy(), env.tok, env.prompts, env.make_gen, env.preference, cfg,
                              eval_prompts=env.eval_prompts, eval_reward_fn=env.reward)
    assert_significant_gain(report)


def test_nash_md_mixture_is_geometric():
    from alignflow.trainers.online.nash_md import mixture_logits

    a, b = torch.randn(3, 7), torch.randn(3, 7)
    mix = mixture_logits(a, b, 0.25).exp()
    pa, pb = a.softmax(-1), b.softmax(-1)
    expected = pa ** 0.75 * pb ** 0.25
    assert torch.allclose(mix, expected / expected.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(mixture_logits(a, b, 0.0).exp(), pa, atol=1e-6)


@pytest.mark.slow
def test_paft_merges_parallel_adapters_and_raises_reward(env):
    from alignflow.trainers.online.paft import PAFTConfig, train_paft

    cfg = PAFTConfig(rounds=2, prompts_per_round=32, k=4, epochs=4, lr=1e-3, sampling=SAMPLING)
    merged, report = train_paft(env.policy(), env.tok, env.prompts, env.make_gen, env.reward, cfg,
                                eval_prompts=env.eval_prompts)
    assert type(merged).__name__ == "LlamaForCausalLM"  # adapters folded into plain weights
    assert_significant_gain(report)


@pytest.mark.slow
def test_token_rewards_point_at_the_wrong_token(env):
    """beta*log(pi/pi_ref) per token: the SFT model (which knows the answers) against an
    untrained reference; a corrupted character gets the lowest token reward, and the token
    rewards sum to the sequence's implicit reward."""
    from alignflow.trainers.logprobs import response_logps
    from alignflow.trainers.token_rewards import token_rewards
    from alignflow.trainers.toy_model import make_tiny_llama

    policy = env.policy()
    ref = make_tiny_llama(env.tok, hidden_size=32, num_layers=1, seed=1).eval()
    prompt = env.task.prompts(1, seed=99)[0]
    answer = env.task.reference(prompt)
    pos = len(answer) // 2
    wrong = answer[:pos] + ("q" if answer[pos] != "q" else "z") + answer[pos + 1:]
    rows = token_rewards(policy, ref, env.tok, prompt, wrong, beta=0.1)
    assert len(rows) == len(wrong) + 1  # characters + eos
    assert min(range(len(rows)), key=lambda i: rows[i].reward) == pos
    lp, _ = response_logps(policy, env.tok, [[{"role": "user", "content": prompt}]], [[wrong]])
    rlp, _ = response_logps(ref, env.tok, [[{"role": "user", "content": prompt}]], [[wrong]])
    assert sum(r.reward for r in rows) == pytest.approx(0.1 * float(lp - rlp), abs=1e-3)


@pytest.mark.slow
def test_beam_search_finds_higher_scoring_responses(env, iterative_dpo_run):
    """Reward-guided beam search on the DPO policy (token rewards vs the SFT reference): a
    larger beam finds responses of higher search score (sum of beta*log pi, eq. 23's Q), and
    the batched search equals the one-prompt search. The task reward per beam width is the
    subject of tests/test_token_rewards.py and tests/bench/bench_beam.py; CRINGE's reward gain
    is in tests/test_online_cringe.py."""
    from alignflow.trainers.token_rewards import beam_search, beam_search_batch

    policy, _ = iterative_dpo_run
    ref = env.policy().eval()
    prompts = env.eval_prompts[:8]
    one = beam_search_batch(policy, ref, env.tok, prompts, beam_size=1, max_new_tokens=24)
    four = beam_search_batch(policy, ref, env.tok, prompts, beam_size=4, max_new_tokens=24)
    assert sum(s for _, s in four) > sum(s for _, s in one)
    assert all(b >= a - 1e-6 for (_, a), (_, b) in zip(one, four))
    assert beam_search(policy, ref, env.tok, prompts[0], beam_size=4, max_new_tokens=24)[0] == four[0][0]


def test_cli_rejects_unknown_method(tmp_path):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    res = CliRunner().invoke(app, ["online", "nope", "--model", str(tmp_path), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown method" in res.output


@pytest.mark.slow
def test_flow_composes_judge_and_generator_and_writes_report(toy_world, tmp_path):
    """flows.online.run_online: judge (verifier) + hf generator built in the flow, passed to
    the trainer; the trained model and report.json (reward, KL, spend) are written."""
    import json

    from alignflow.flows.online import run_online

    report = run_online({"method": "rloo", "model": str(toy_world.path), "output": str(tmp_path / "run"),
                         "num_prompts": 8, "num_eval_prompts": 4, "params": {"steps": 1, "prompts_per_step": 4, "k": 2}})
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["generations"] == 8 and saved["judge_calls"] == 8 and saved["method"] == "rloo"
    assert {"reward_before", "reward_after", "kl_to_ref", "wall_s"} <= set(report)
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_nash_md_trains_truncated_samples_without_eos(toy_world, monkeypatch):
    """A sample cut at the token budget never emitted eos: Nash-MD must score it (policy and
    reference) without one, as the other trainers do (``rollout.finished_flags``)."""
    from alignflow.trainers.online import nash_md
    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

    env = toy_env(toy_world, n_prompts=8, n_eval=2)
    budget = 6  # the toy's answers are longer: most samples are cut, short ones end by themselves
    seen_gens, scored = [], []

    def make_gen(model, tok):
        inner = env.make_gen(model, tok)

        class Recording:
            name = "recording"

            def generate(self, prompts, n=1, sampling=None):
                out = inner.generate(prompts, n=n, sampling=sampling)
                seen_gens.append([g for gs in out for g in gs])
                return out

        return Recording()

    real = nash_md.response_logps

    def spy(model, tokenizer, prompts, responses, finished=None, **kw):
        scored.append((list(responses), finished))
        return real(model, tokenizer, prompts, responses, finished, **kw)

    monkeypatch.setattr(nash_md, "response_logps", spy)
    cfg = NashMDConfig(steps=1, prompts_per_step=8, sampling=SamplingParams(temperature=1.0, max_new_tokens=budget))
    train_nash_md(env.policy(), env.tok, env.prompts, make_gen, env.preference, cfg, eval_prompts=env.eval_prompts,
                  eval_reward_fn=env.reward)
    train_gens = seen_gens[1]  # [0] is the starting evaluation
    expected = [[g.n_tokens < budget] for g in train_gens]
    assert any(not f for [f] in expected) and any(f for [f] in expected)  # both kinds occur
    assert len(scored) == 2  # policy and reference
    for responses, finished in scored:
        assert responses == [[g.text] for g in train_gens]
        assert finished == expected
