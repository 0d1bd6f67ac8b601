"""CUDA checks: run with `bash tests/gpu.sh` where a GPU is lent; skipped elsewhere.

bf16 losses against a float64 CPU reference, seeded generation and prefix-cached judge scoring on
cuda, and every online trainer for one or two steps with its policy on cuda (finite losses,
weights moved, tensors on cuda)."""

from __future__ import annotations

import pytest
import torch

from alignflow.schemas.generator import SamplingParams
from alignflow.trainers.losses import LOSSES, compute_loss, loss_spec
from tests.test_online import toy_env
from tests.test_reward_model import _ranked_examples

pytestmark = pytest.mark.gpu

PAIRWISE = [name for name in LOSSES if loss_spec(name).kind == "pairwise" and not loss_spec(name).extra_keys]


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_on_cuda_bf16_match_float64_cpu(name):
    gen = torch.Generator().manual_seed(0)
    batch = {k: -torch.rand(16, generator=gen, dtype=torch.float64) * 50
             for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    batch["chosen_tokens"] = torch.randint(1, 40, (16,), generator=gen).double()
    batch["rejected_tokens"] = torch.randint(1, 40, (16,), generator=gen).double()
    # The reference sees the same bf16-rounded inputs: what is checked is the loss arithmetic on
    # cuda, not how far bf16 can round a log-prob of -50 (by 0.125, which DPOP's lam=50 amplifies).
    rounded = {k: v.to(torch.bfloat16).double() for k, v in batch.items()}
    reference = compute_loss(name, rounded)
    on_gpu = {k: v.to("cuda", torch.bfloat16).requires_grad_(k.endswith("logps") and not k.startswith("ref"))
              for k, v in batch.items()}
    loss = compute_loss(name, on_gpu)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    assert torch.isfinite(on_gpu["chosen_logps"].grad.float()).all()
    torch.testing.assert_close(loss.double().cpu(), reference, rtol=1e-4, atol=1e-4)


def test_hf_generator_on_cuda_matches_seeded_cpu_shapes(toy_world):
    from alignflow.feedback.generation.hf import HFGenerator

    prompts = [[{"role": "user", "content": p}] for p in toy_world.task.prompts(8, seed=3)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=32, seed=0)
    gpu = HFGenerator(toy_world.path, device="cuda", dtype=torch.bfloat16).generate(prompts, n=2, sampling=sampling)
    assert [len(g) for g in gpu] == [2] * 8
    assert all(s.n_tokens > 0 and s.logp is not None and s.logp <= 0 for g in gpu for s in g)


@pytest.mark.parametrize("path", ["kv-buffers", "generic-cache"])
def test_prefix_cached_judge_scoring_on_cuda_matches_plain_scoring(path, monkeypatch):
    """The judge's prefix-cached scorer (preallocated key/value buffers, or copied caches) on a
    cuda model gives the log-probs of scoring each sequence from scratch, and the debiased
    pairwise probability stays order-symmetric."""
    import numpy as np

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.feedback.judges import PairwiseJudge, PrefixCachedScorer, scoring
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    if path == "generic-cache":
        monkeypatch.setattr(scoring, "_plain_layers", lambda cache: False)
    tok = make_char_tokenizer()
    gen = HFGenerator(make_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=3), tok, device="cuda",
                      batch_size=16)
    assert next(gen.model.parameters()).device.type == "cuda"
    template = PairwiseJudge(gen).template
    msgs = [template.messages(f"Reverse: {w}", a, b) for w in ("abc", "hello") for a, b in ((w[::-1], w), (w, w[::-1]))]
    conts = [["1", "2"], ["1", "2 because"], ["x", "22"], ["2", "1"]]
    got = PrefixCachedScorer(gen.model, gen.tokenizer, batch_size=3).score_batch(msgs, conts)
    ref = gen.score_batch([m for m, cs in zip(msgs, conts) for _ in cs], [c for cs in conts for c in cs])
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4)
    judge = PairwiseJudge(gen)
    prompts, a, b = ["Reverse: abc", "Write in capitals: xy"], ["cba", "XY!"], ["abc", "XY"]
    ab, ba = judge.judge(prompts, a, b), judge.judge(prompts, b, a)
    np.testing.assert_allclose(ab.judge_prob + ba.judge_prob, 1.0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Online trainers on CUDA: one or two steps each on the toy world, mirroring the CPU tests'
# calls (tests/test_online.py, test_dro_v.py, test_reward_model.py) with the policy on cuda.
# float32 weights (bf16 parameters may round an early Adam step away); one bf16 RLOO run.
# The training rewards are chosen so every step has a non-zero signal: a step with all-equal
# rewards has zero advantages and would leave the weights unchanged by design.
# --------------------------------------------------------------------------------------------
ONLINE_SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def cuda_env(toy_world):
    return toy_env(toy_world, "cuda", n_prompts=32, n_eval=4)


def ranked_reward(prompts, responses):
    """Distinct rewards within every group of samples (position in the flat list), returned as a
    CUDA tensor (a reward function may return one): RLOO / PPO advantages are never all zero."""
    return torch.arange(len(responses), dtype=torch.float32, device="cuda") / max(1, len(responses))


def text_order_preference(prompts, a, b):
    """A strict preference by text order (P = 0.9 / 0.1, 0.5 on equal texts): distinct win-rates."""
    return [0.9 if x > y else 0.1 if x < y else 0.5 for x, y in zip(a, b)]


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(before, model) -> bool:
    return any(not torch.equal(a, b.detach().to(a.device)) for a, b in zip(before, model.parameters()))


def _finite(x) -> bool:
    return x is not None and torch.isfinite(torch.as_tensor(float(x))).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rloo_steps_on_cuda(cuda_env, dtype):
    from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

    policy = cuda_env.policy(dtype)
    before = _snapshot(policy)
    cfg = RLOOConfig(steps=2, prompts_per_step=4, k=2, lr=3e-4, beta=0.05, sampling=ONLINE_SAMPLING)
    out, report = train_rloo(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen, ranked_reward, cfg,
                             eval_prompts=cuda_env.eval_prompts, eval_reward_fn=cuda_env.reward)
    assert len(report.history) == 2 and all(_finite(h["loss"]) and _finite(h["kl"]) for h in report.history)
    assert _finite(report.reward_after) and _finite(report.kl_to_ref)
    assert next(out.parameters()).device.type == "cuda" and _changed(before, out)


def test_ppo_steps_on_cuda(cuda_env):
    from alignflow.trainers.online.ppo import PPOConfig, train_ppo

    texts = [f"{p} {cuda_env.task.reference(p)}" for p in cuda_env.task.prompts(8, seed=5)]
    policy = cuda_env.policy()
    before = _snapshot(policy)
    cfg = PPOConfig(steps=2, prompts_per_step=4, samples_per_prompt=2, ptx_coef=0.5, beta=0.1, lr=3e-4,
                    sampling=ONLINE_SAMPLING)
    out, value_head, report = train_ppo(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen, ranked_reward,
                                        cfg, ptx_texts=texts, eval_prompts=cuda_env.eval_prompts,
                                        eval_reward_fn=cuda_env.reward)
    assert len(report.history) == 2
    assert all(_finite(h["policy_loss"]) and _finite(h["value_loss"]) and _finite(h["kl"]) for h in report.history)
    assert value_head.linear.weight.device.type == "cuda" and value_head.linear.weight.abs().sum() > 0
    assert _changed(before, out)


@pytest.mark.parametrize("method", ["iterative-dpo", "cringe", "sppo"])
def test_iterative_round_on_cuda(cuda_env, method):
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    policy = cuda_env.policy()
    before = _snapshot(policy)
    cfg = IterativeConfig(method=method, rounds=1, prompts_per_round=8, k=4, epochs=1, batch_size=8, lr=3e-4,
                          terminate=False, sampling=ONLINE_SAMPLING)
    out, report = train_iterative(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen, cfg,
                                  reward_fn=ranked_reward, preference_fn=text_order_preference,
                                  eval_prompts=cuda_env.eval_prompts, eval_reward_fn=cuda_env.reward)
    (entry,) = report.history
    assert entry["pairs"] > 0 and _finite(entry["loss"]), entry
    assert _finite(report.kl_to_ref) and _changed(before, out)


def test_nash_md_step_on_cuda(cuda_env):
    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

    policy = cuda_env.policy()
    before = _snapshot(policy)
    cfg = NashMDConfig(steps=1, prompts_per_step=4, lr=3e-4, sampling=ONLINE_SAMPLING)
    # P(y > y_mix) = 0.9 everywhere: advantage 0.4 - beta * kl, a non-zero step
    out, report = train_nash_md(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen,
                                lambda p, a, b: [0.9] * len(a), cfg, eval_prompts=cuda_env.eval_prompts,
                                eval_reward_fn=cuda_env.reward)
    (entry,) = report.history
    assert entry["preference_vs_mixture"] == pytest.approx(0.9) and _finite(entry["kl"])
    assert _finite(report.kl_to_ref) and _changed(before, out)


def test_nash_md_mixture_sampling_on_cuda(cuda_env):
    """Mixture sampling with the trainers' CPU generator and CUDA models: seeded, so repeatable."""
    from alignflow.trainers.modeling import frozen_copy
    from alignflow.trainers.online.nash_md import sample_mixture

    policy = cuda_env.policy()
    ref = frozen_copy(policy)
    draws = [sample_mixture(policy, ref, cuda_env.tok, cuda_env.prompts[:3], 0.25, 8,
                            generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert len(draws[0]) == 3 and draws[0] == draws[1]


@pytest.mark.parametrize("value_outputs", ["prompt", "response"])
def test_dro_v_steps_on_cuda(cuda_env, value_outputs):
    from alignflow.trainers.online.dro_v import DROVConfig, Trajectory, train_dro_v

    policy = cuda_env.policy()
    before = _snapshot(policy)
    prompts = cuda_env.task.prompts(4, seed=3)
    data = [Trajectory([{"role": "user", "content": p}], cuda_env.task.reference(p), 1.0) for p in prompts]
    data += [Trajectory([{"role": "user", "content": p}], "zzz", -1.0) for p in prompts]
    cfg = DROVConfig(beta=0.5, epochs=1, batch_size=4, value_outputs=value_outputs)
    out, value_net, report = train_dro_v(policy, cuda_env.tok, cfg, trajectories=data)
    assert len(report.history) == 2
    assert all(_finite(h["policy_loss"]) and _finite(h["value_loss"]) for h in report.history)
    assert next(value_net.parameters()).device.type == "cuda" and value_net.head.weight.device.type == "cuda"
    assert _changed(before, out)


def test_dro_v_collected_round_on_cuda(cuda_env):
    from alignflow.trainers.online.dro_v import DROVConfig, train_dro_v

    policy = cuda_env.policy()
    before = _snapshot(policy)
    cfg = DROVConfig(beta=0.5, epochs=1, batch_size=4, prompts_per_round=4, k=2, sampling=ONLINE_SAMPLING)
    out, _, report = train_dro_v(policy, cuda_env.tok, cfg, prompts=cuda_env.prompts, make_generator=cuda_env.make_gen,
                                 reward_fn=ranked_reward, eval_prompts=cuda_env.eval_prompts,
                                 eval_reward_fn=cuda_env.reward)
    assert report.extra["trajectories"] == 8 and all(_finite(h["policy_loss"]) for h in report.history)
    assert _finite(report.kl_to_ref) and _changed(before, out)


def test_paft_round_on_cuda(cuda_env):
    from alignflow.trainers.online.paft import PAFTConfig, train_paft

    policy = cuda_env.policy()
    cfg = PAFTConfig(rounds=1, prompts_per_round=8, k=4, epochs=1, lr=1e-3, sampling=ONLINE_SAMPLING)
    merged, report = train_paft(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen, ranked_reward, cfg,
                                eval_prompts=cuda_env.eval_prompts, eval_reward_fn=cuda_env.reward)
    (entry,) = report.history
    assert entry["pairs"] > 0 and _finite(entry["dpo_loss"][0]) and _finite(entry["sft_loss"][0])
    assert next(merged.parameters()).device.type == "cuda" and _finite(report.kl_to_ref)


def test_bt_reward_model_steps_on_cuda(cuda_env):
    from alignflow.trainers.reward_model import RewardModelConfig, make_reward_model, reward_scores, train_reward_model

    rm = make_reward_model(cuda_env.path, cuda_env.tok).to("cuda")
    before = _snapshot(rm)
    train, held = _ranked_examples(cuda_env.task, 8, seed=1), _ranked_examples(cuda_env.task, 4, seed=2)
    cfg = RewardModelConfig(epochs=1, lr=1e-3, prompts_per_batch=4)
    metrics = train_reward_model(rm, cuda_env.tok, train, held, cfg)
    assert _finite(metrics["train_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert _changed(before, rm)
    scores = reward_scores(rm, cuda_env.tok, [e.prompt for e in held], [e.responses[0] for e in held])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_preference_model_steps_on_cuda(cuda_env):
    from alignflow.trainers.preference_model import PreferenceModelConfig, PreferenceModelFn, train_preference_model
    from alignflow.trainers.reward_model import make_reward_model

    pm = make_reward_model(cuda_env.path, cuda_env.tok).to("cuda")
    before = _snapshot(pm)
    train, held = _ranked_examples(cuda_env.task, 8, seed=1), _ranked_examples(cuda_env.task, 4, seed=2)
    metrics = train_preference_model(pm, cuda_env.tok, train, held, PreferenceModelConfig(epochs=1, lr=1e-3))
    assert _finite(metrics["train_loss"]) and _changed(before, pm)
    probs = PreferenceModelFn(pm, cuda_env.tok)([e.prompt for e in held], [e.responses[0] for e in held],
                                                [e.responses[1] for e in held])
    assert len(probs) == 4 and all(0.0 <= p <= 1.0 for p in probs)


def test_trainers_follow_a_policy_the_generator_moves(cuda_env):
    """The flow's case (flows/online.py): the policy is loaded on the CPU and the generator
    factory moves it to cuda on first use; the reference copy and the value head follow it."""
    from transformers import AutoModelForCausalLM

    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md
    from alignflow.trainers.online.ppo import PPOConfig, train_ppo
    from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

    common = dict(eval_prompts=cuda_env.eval_prompts, eval_reward_fn=cuda_env.reward)
    policy = AutoModelForCausalLM.from_pretrained(cuda_env.path)
    before = _snapshot(policy)  # on the CPU
    out, report = train_rloo(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen, ranked_reward,
                             RLOOConfig(steps=1, prompts_per_step=4, k=2, sampling=ONLINE_SAMPLING), **common)
    assert next(out.parameters()).device.type == "cuda" and _finite(report.history[0]["loss"])
    assert _changed(before, out)  # the optimizer built before the move updated the moved weights
    policy = AutoModelForCausalLM.from_pretrained(cuda_env.path)
    out, value_head, report = train_ppo(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen, ranked_reward,
                                        PPOConfig(steps=1, prompts_per_step=4, sampling=ONLINE_SAMPLING), **common)
    assert value_head.linear.weight.device.type == "cuda" and _finite(report.history[0]["value_loss"])
    policy = AutoModelForCausalLM.from_pretrained(cuda_env.path)
    out, report = train_nash_md(policy, cuda_env.tok, cuda_env.prompts, cuda_env.make_gen,
                                lambda p, a, b: [0.9] * len(a),
                                NashMDConfig(steps=1, prompts_per_step=4, sampling=ONLINE_SAMPLING), **common)
    assert next(out.parameters()).device.type == "cuda" and _finite(report.history[0]["kl"])


def test_beam_search_and_token_rewards_on_cuda(cuda_env):
    from alignflow.trainers.modeling import frozen_copy
    from alignflow.trainers.token_rewards import beam_search_batch, token_rewards

    policy = cuda_env.policy()
    ref = frozen_copy(policy)
    found = beam_search_batch(policy, ref, cuda_env.tok, cuda_env.task.prompts(3, seed=4), beam_size=3,
                              max_new_tokens=8, objective="reward")
    assert len(found) == 3 and all(_finite(score) for _, score in found)
    rows = token_rewards(policy, ref, cuda_env.tok, cuda_env.task.prompts(1, seed=4)[0], "abc")
    assert rows and all(_finite(r.reward) for r in rows)
