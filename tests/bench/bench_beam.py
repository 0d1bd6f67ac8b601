"""Reward-guided beam search (survey 3.4.1) on the toy world: task reward per beam width.

    python tests/bench/bench_beam.py [--world DIR] [--threads 1] [--widths 1,2,4,8]

The protocol was fixed before measuring (calibrated on other prompts, seed 13):

- policy: the SFT policy after 2 rounds of iterative DPO on toy-world preferences (32 prompts
  a round, K = 4, best vs worst by the task reward, lr 3e-4; as tests/test_online.py);
  reference: the SFT policy;
- search: ``beam_search_batch`` with objective ``"q"`` (eq. 23: the summed beta*log pi, i.e.
  the implicit reward plus beta*log pi_ref), beta 0.1, 32 new tokens, no length penalty;
  also objective ``"reward"`` (the implicit reward alone), reported for comparison;
- prompts: (A) "two-digit": EVERY "Spell out: n" for n in 0..99 that is not a DPO training
  prompt (a tenth of the task's prompts, so the char model learned them least: greedy is
  imperfect there); (B) "all": 128 held-out prompts of the task's own distribution (seed 12);
- metric: mean task reward (and exact-match share) against the TASK, not the search score;
  one-sided paired t-test of each width against beam 1 (greedy) on the same prompts;
- DPO runs: seeds 0, 1, 2 (three policies), each reported, and pooled ("dpo-all": each
  prompt's reward averaged over the three policies, then the paired test over prompts). The
  first measurement used seed 0 alone (beam 8 vs greedy p = 0.044 on the two-digit set); the
  three-seed pooling was added before the seeds 1 and 2 were measured.

The baseline measured in the same run is beam 1 (greedy decoding); "ratio" is the mean reward
over greedy's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DPO_SETTINGS = dict(rounds=2, prompts_per_round=32, k=4, epochs=2, batch_size=16, lr=3e-4, terminate=False)


def dpo_policy(world, train_prompts, seed: int = 0):
    """The SFT policy after iterative DPO on toy-world preferences (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.online import policy_generator_factory, toy_reward
    from schemas.generator import SamplingParams
    from trainers.iterative.loop import IterativeConfig, train_iterative

    tok = AutoTokenizer.from_pretrained(world.path)
    cfg = IterativeConfig(method="iterative-dpo", sampling=SamplingParams(temperature=1.0, max_new_tokens=24),
                          seed=seed, **DPO_SETTINGS)
    reward = toy_reward(world.task)
    policy, _ = train_iterative(AutoModelForCausalLM.from_pretrained(world.path), tok, train_prompts,
                                policy_generator_factory("cpu"), cfg, reward_fn=reward,
                                eval_prompts=train_prompts[:8], eval_reward_fn=reward)
    return policy.eval(), tok


def two_digit_prompts(train_prompts) -> list:
    """Every "Spell out: n", n in 0..99, that is not among the training prompts."""
    from trainers.iterative.rollout import as_messages, prompt_text_of

    seen = {prompt_text_of(p) for p in train_prompts}
    return [as_messages(f"Spell out: {n}") for n in range(100) if f"Spell out: {n}" not in seen]


def search_rewards(policy, ref, tok, task, prompts, widths, objective: str, max_new_tokens: int = 32) -> dict:
    """``{width: (task rewards [N] numpy, search scores [N], lengths [N], wall seconds)}``."""
    import numpy as np

    from trainers.iterative.rollout import prompt_text_of
    from trainers.token_rewards import beam_search_batch

    texts = [prompt_text_of(p) for p in prompts]
    out = {}
    for w in widths:
        t0 = time.perf_counter()
        found = beam_search_batch(policy, ref, tok, prompts, beam_size=w, beta=0.1, max_new_tokens=max_new_tokens,
                                  objective=objective)
        wall = time.perf_counter() - t0
        out[w] = (task.rewards(texts, [o[0] for o in found]), np.array([o[1] for o in found]),
                  np.array([len(o[0]) for o in found]), wall)
    return out


def rows_of(runs: list[dict], widths) -> list[dict]:
    """Per width: means over runs and prompts; the paired test is on each prompt's difference
    to greedy averaged over the runs (one observation per prompt)."""
    import numpy as np
    from scipy.stats import ttest_rel

    rows = []
    base = np.mean([r[widths[0]][0] for r in runs], 0)
    for w in widths:
        rew = np.mean([r[w][0] for r in runs], 0)
        changed = sum(int((r[w][0] != r[widths[0]][0]).sum()) for r in runs)
        rows.append({"beam": w, "reward": float(rew.mean()), "ratio": float(rew.mean() / base.mean()),
                     "exact": float(np.mean([(r[w][0] == 1.0).mean() for r in runs])),
                     "score": float(np.mean([r[w][1].mean() for r in runs])),
                     "len": float(np.mean([r[w][2].mean() for r in runs])), "changed": changed,
                     "p": float(ttest_rel(rew, base, alternative="greater").pvalue) if w != widths[0] else float("nan"),
                     "wall_s": float(sum(r[w][3] for r in runs))})
    return rows


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from flows.toy_world import build_toy_world
    from trainers.iterative.rollout import as_messages

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "alignflow-bench-world"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the DPO runs (one policy each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    world = build_toy_world(Path(args.world), seed=0)
    train_prompts = [as_messages(p) for p in world.task.prompts(64, seed=11)]
    ref = AutoModelForCausalLM.from_pretrained(world.path).eval()
    sets = {"two-digit": two_digit_prompts(train_prompts),
            "all": [as_messages(p) for p in world.task.prompts(128, seed=12)]}
    runs: dict = {}
    for seed in seeds:
        t0 = time.perf_counter()
        policy, tok = dpo_policy(world, train_prompts, seed)
        print(f"DPO policy (seed {seed}) trained in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, prompts in sets.items():
            for objective in ("q", "reward"):
                runs.setdefault((name, f"dpo-{seed}", objective), []).append(
                    search_rewards(policy, ref, tok, world.task, prompts, widths, objective))
    for name, prompts in sets.items():
        runs[(name, "sft", "q")] = [search_rewards(ref, ref, tok, world.task, prompts, widths, "q")]
        for objective in ("q", "reward"):
            runs[(name, "dpo-all", objective)] = [r for s in seeds for r in runs[(name, f"dpo-{s}", objective)]]
    print(f"{'prompts':10s} {'policy':8s} {'objective':9s} {'beam':>4s} {'reward':>7s} {'ratio':>6s} {'exact':>6s} "
          f"{'score':>8s} {'len':>5s} {'changed':>7s} {'p':>8s} {'wall_s':>7s}")
    for (name, pol, objective), rs in runs.items():
        for r in rows_of(rs, widths):
            print(f"{name:10s} {pol:8s} {objective:9s} {r['beam']:4d} {r['reward']:7.4f} {r['ratio']:6.3f} "
                  f"{r['exact']:6.3f} {r['score']:8.4f} {r['len']:5.1f} {r['changed']:7d} {r['p']:8.2g} "
                  f"{r['wall_s']:7.2f}", flush=True)
    print(", ".join(f"{name}: {len(p)} prompts" for name, p in sets.items()),
          "| p: one-sided paired t-test vs beam 1 over prompts (per-prompt mean over the DPO runs)")


if __name__ == "__main__":
    main()
