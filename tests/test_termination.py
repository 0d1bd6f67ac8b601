"""The termination rule inside the iterative trainer and the align flow, on scripted policies
whose held-out answers are known: a run that keeps improving runs on, one that stops improving
stops at that iteration with the binomial evidence, one that gets worse rolls back.

The trainer's generator is scripted: training samples always give a pair (so the tiny policy
really trains), and the held-out answers of evaluation e (e = 0 for the start, t after round t)
are right on the first ``schedule[e]`` of the 64 held-out prompts. Between two iterations the
new one wins exactly on the prompts it newly answers right and loses where it stopped.
"""

from __future__ import annotations

import pytest
import torch

from alignflow.schemas.generator import Generation, SamplingParams

N_EVAL = 64


def _reward(prompts, responses):
    return [1.0 if r == "right" else 0.0 for r in responses]


class ScriptedGenerators:
    """A ``PolicyGeneratorFactory`` whose generators answer by script; records the policy's
    weights at every evaluation."""

    def __init__(self, schedule):
        self.schedule, self.evaluations, self.weights = list(schedule), 0, []

    def __call__(self, model, tokenizer):
        outer = self

        class Scripted:
            def generate(self, prompts, n=1, sampling=None):
                texts = [p[-1]["content"] for p in prompts]
                if not texts[0].startswith("held-out"):  # a training round: one right, the rest wrong
                    return [[Generation("right" if j == 0 else "wrong", 5) for j in range(n)] for _ in prompts]
                e = min(outer.evaluations, len(outer.schedule) - 1)
                outer.evaluations += 1
                outer.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                right = outer.schedule[e]
                return [[Generation("right" if int(t.split()[-1]) < right else "wrong", 5)] * n for t in texts]

        return Scripted()


def _run(schedule, rounds):
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    tok = make_char_tokenizer()
    policy = make_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    gens = ScriptedGenerators(schedule)
    cfg = IterativeConfig(method="iterative-dpo", rounds=rounds, prompts_per_round=4, k=2, epochs=1, batch_size=4,
                          lr=1e-3, terminate=True, alpha=0.05, sampling=SamplingParams(max_new_tokens=8))
    prompts = [[{"role": "user", "content": f"train {i}"}] for i in range(8)]
    held_out = [[{"role": "user", "content": f"held-out {i}"}] for i in range(N_EVAL)]
    policy, report = train_iterative(policy, tok, prompts, gens, cfg, reward_fn=_reward, eval_prompts=held_out)
    return policy, report, gens


def test_a_run_that_keeps_improving_runs_every_round():
    _, report, _ = _run([0, 20, 40, 60], rounds=3)
    assert [h["round"] for h in report.history] == [1, 2, 3]
    for h in report.history:
        t = h["termination"]
        # 20 new wins, no loss, 44 ties split evenly: 42 of 64, one-sided binomial p = 0.0084
        assert (t["wins"], t["losses"], t["ties"], t["n"]) == (20, 0, 44, 64)
        assert t["p_value"] == pytest.approx(0.00836, abs=1e-4) and t["significant"] and not t["stop"]
    assert report.extra["rounds_run"] == 3


def test_a_run_that_stops_improving_stops_there_with_the_evidence():
    _, report, _ = _run([0, 20, 40, 40, 40], rounds=4)
    assert [h["round"] for h in report.history] == [1, 2, 3]  # round 4 never ran
    t2, t3 = report.history[1]["termination"], report.history[2]["termination"]
    assert t2["significant"] and not t2["stop"]
    assert (t3["wins"], t3["losses"], t3["ties"]) == (0, 0, 64)  # iteration 3 = iteration 2
    assert t3["p_value"] == pytest.approx(0.5497, abs=1e-3) and not t3["significant"] and t3["stop"]
    assert "not significantly above 1/2" in t3["reason"] and report.termination == t3
    assert not report.history[2].get("rolled_back")  # no worse: the newest iterate is kept


def test_a_run_that_gets_worse_stops_and_keeps_the_previous_iterate():
    policy, report, gens = _run([0, 20, 40, 30], rounds=3)
    t3 = report.history[2]["termination"]
    assert (t3["wins"], t3["losses"]) == (0, 10) and t3["stop"] and report.history[2]["rolled_back"]
    after_round_2, after_round_3 = gens.weights[2], gens.weights[3]
    assert any(not torch.equal(after_round_2[k], after_round_3[k]) for k in after_round_2)  # round 3 trained
    assert all(torch.equal(v, after_round_2[k]) for k, v in policy.state_dict().items())  # and was undone


def test_align_flow_rule_on_scripted_histories():
    """flows/align.py's rule on held-out per-prompt rewards (k samples averaged): the same binomial
    evidence decides."""
    from alignflow.flows.align import should_stop
    from alignflow.flows.config import AlignConfig

    cfg = AlignConfig.model_validate({"name": "t"})

    def it(right: int) -> dict:
        rewards = [1.0 if i < right else 0.0 for i in range(N_EVAL)]
        return {"reward": sum(rewards) / N_EVAL, "prompt_rewards": rewards}

    stop, _, evidence = should_stop([it(0), it(20)], cfg)
    assert not stop and (evidence["wins"], evidence["losses"]) == (20, 0) and evidence["significant"]
    stop, why, evidence = should_stop([it(0), it(20), it(20)], cfg)
    assert stop and not evidence["significant"] and evidence["p_value"] > 0.5 and why
    stop, why, evidence = should_stop([it(20), it(10)], cfg)
    assert stop and evidence["losses"] == 10 and evidence["reward_gain"] < 0
