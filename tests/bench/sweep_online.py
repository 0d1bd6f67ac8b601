"""Sweep of every online method on the toy world, one budget each.

    python tests/bench/sweep_online.py [--world DIR] [--budget small|medium] [--methods a,b,...]

Prints, per method: held-out reward before and after (same prompts, same sampling seed), the
gain, the Monte-Carlo KL to the starting (reference) policy, wall time, and how many responses
were generated and judge/reward calls spent. The baseline measured in the same run is the
starting SFT policy itself (gain 0 by definition); "ratio" is reward_after / reward_before.

The budget: every method gets about the same number of sampled responses (``--samples``,
default 512) on the same training prompts; evaluation is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def method_configs(samples: int, sampling) -> dict:
    from alignflow.trainers.online.dro_v import DROVConfig
    from alignflow.trainers.online.iterative import IterativeConfig
    from alignflow.trainers.online.nash_md import NashMDConfig
    from alignflow.trainers.online.paft import PAFTConfig
    from alignflow.trainers.online.ppo import PPOConfig
    from alignflow.trainers.online.rloo import RLOOConfig

    k = 4
    per_round = 32
    rounds = max(1, samples // (k * per_round))
    it = dict(rounds=rounds, prompts_per_round=per_round, k=k, epochs=2, batch_size=16, lr=5e-4,
              sampling=sampling, alpha=0.05, terminate=False)
    return {
        "ppo": PPOConfig(steps=max(1, samples // 32), prompts_per_step=16, samples_per_prompt=2, lr=3e-4,
                         beta=0.02, sampling=sampling),
        "rloo": RLOOConfig(steps=max(1, samples // 32), prompts_per_step=8, k=4, lr=3e-4, beta=0.02, sampling=sampling),
        "iterative-dpo": IterativeConfig(method="iterative-dpo", **it),
        "self-rewarding": IterativeConfig(method="self-rewarding", **it),
        "cringe": IterativeConfig(method="cringe", **it),
        "sppo": IterativeConfig(method="sppo", **{**it, "beta": 0.2}),
        "dno": IterativeConfig(method="dno", **it),
        "nash-md": NashMDConfig(steps=max(1, samples // 32), prompts_per_step=16, lr=3e-4, sampling=sampling),
        "paft": PAFTConfig(rounds=rounds, prompts_per_round=per_round, k=k, epochs=2, sampling=sampling),
        # offline DRO-V: one collection of single scored samples from the SFT policy, then epochs
        "dro-v": DROVConfig(beta=0.03, epochs=4, batch_size=16, lr=3e-4, prompts_per_round=max(1, samples // k),
                            k=k, sampling=sampling),
    }


def run(method: str, cfg, world, prompts, eval_prompts) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.flows.online import RewardPreference, policy_generator_factory, toy_reward

    tok = AutoTokenizer.from_pretrained(world.path)
    policy = AutoModelForCausalLM.from_pretrained(world.path)
    make_gen = policy_generator_factory("cpu")
    reward = toy_reward(world.task)
    pref = RewardPreference(reward, scale=0.1)
    t0 = time.perf_counter()
    if method == "ppo":
        from alignflow.trainers.online.ppo import train_ppo

        _, _, rep = train_ppo(policy, tok, prompts, make_gen, reward, cfg, eval_prompts=eval_prompts)
    elif method == "rloo":
        from alignflow.trainers.online.rloo import train_rloo

        _, rep = train_rloo(policy, tok, prompts, make_gen, reward, cfg, eval_prompts=eval_prompts)
    elif method == "nash-md":
        from alignflow.trainers.online.nash_md import train_nash_md

        _, rep = train_nash_md(policy, tok, prompts, make_gen, pref, cfg, eval_prompts=eval_prompts, eval_reward_fn=reward)
    elif method == "dro-v":
        from alignflow.trainers.online.dro_v import train_dro_v

        _, _, rep = train_dro_v(policy, tok, cfg, prompts=prompts, make_generator=make_gen, reward_fn=reward,
                                eval_prompts=eval_prompts)
    elif method == "paft":
        from alignflow.trainers.online.paft import train_paft

        _, rep = train_paft(policy, tok, prompts, make_gen, reward, cfg, eval_prompts=eval_prompts)
    else:
        from alignflow.trainers.encoding import prompt_text_of
        from alignflow.trainers.online.iterative import train_iterative

        # self-rewarding on the toy world: a char-level model cannot read a rubric, so its
        # "own judge" is the verifier (labelled as such in the table)
        gold = {prompt_text_of(p): world.task.reference(prompt_text_of(p)) for p in prompts}
        _, rep = train_iterative(policy, tok, prompts, make_gen, cfg, reward_fn=reward, preference_fn=pref,
                                 judge_factory=lambda m, t: reward, gold=gold, eval_prompts=eval_prompts,
                                 eval_reward_fn=reward)
    return {"method": method, "before": rep.reward_before, "after": rep.reward_after, "gain": rep.reward_gain,
            "ratio": rep.reward_after / rep.reward_before if rep.reward_before else float("nan"),
            "kl": rep.kl_to_ref, "wall_s": time.perf_counter() - t0, "generations": rep.generations,
            "judge_calls": rep.judge_calls}


def main() -> None:
    import torch

    from alignflow.flows.toy_world import build_toy_world
    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.encoding import as_messages

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "alignflow-bench-world"))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--methods", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = build_toy_world(Path(args.world), seed=0)
    prompts = [as_messages(p) for p in world.task.prompts(128, seed=11)]
    eval_prompts = [as_messages(p) for p in world.task.prompts(64, seed=12)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16)
    configs = method_configs(args.samples, sampling)
    chosen = [m for m in args.methods.split(",") if m] or list(configs)
    rows = []
    print(f"{'method':15s} {'before':>7s} {'after':>7s} {'gain':>7s} {'ratio':>6s} {'KL':>7s} {'wall_s':>7s} {'gens':>6s} {'judge':>6s}")
    for m in chosen:
        row = run(m, configs[m], world, prompts, eval_prompts)
        rows.append(row)
        print(f"{m:15s} {row['before']:7.4f} {row['after']:7.4f} {row['gain']:+7.4f} {row['ratio']:6.2f} "
              f"{row['kl']:7.3f} {row['wall_s']:7.1f} {row['generations']:6d} {row['judge_calls']:6d}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
