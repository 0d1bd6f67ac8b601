"""Reward-guided beam search (survey 3.4.1) on the toy world: task reward per beam width.

    python tests/bench/bench_beam.py [--world DIR] [--threads 1] [--widths 1,2,4,8]
    python tests/bench/bench_beam.py --calibrate     # the calibration grid (calibration prompts only)

Protocol (v2, written down after calibration and BEFORE the evaluation prompts were measured;
it replaces v1, whose DPO training appended eos to samples cut off at max_new_tokens, a bug
fixed in trainers/iterative/loop.py; with the fix v1 gave 0.838 -> 0.843, p = 0.24):

- training prompts: ``task.prompts(64, seed=11)``;
- policy: the SFT policy after 2 rounds of iterative DPO on toy-world preferences (32 prompts
  a round, K = 4, best vs worst by the task reward, 2 epochs, batch 16, lr 1e-4, DPO beta 0.1,
  samples of at most 32 new tokens: the longest toy answer, 27 characters + eos, fits, so no
  training sample is cut off); DPO seeds 0, 1, 2 (three policies); reference: the SFT policy;
- search: ``beam_search_batch`` with objective ``"q"`` (eq. 23: the summed beta*log pi; its
  ranking does not depend on beta), 32 new tokens, no length penalty; widths 1, 2, 4, 8
  (beam 1 = greedy decoding, the baseline); objective ``"reward"`` (the implicit reward
  beta*log(pi/pi_ref) alone) is reported for comparison only;
- evaluation prompts (PRIMARY): the first 192 distinct prompts of ``task.prompts(400, seed=14)``
  that are neither training nor calibration prompts; SECONDARY: every two-digit "Spell out: n"
  not among the training prompts (the v1 set; already looked at under v1, so not primary);
- metric: mean task reward (and exact-match share) against the TASK, not the search score;
  each prompt's reward averaged over the three DPO policies, then a one-sided paired t-test of
  each width against beam 1 over prompts. The primary claim: beam 8 > greedy at p < 0.05.
- also measured: the same search on the SFT policy itself (policy = reference). There the Q
  objective is the SFT model's own log-likelihood (the implicit reward is 0), so its beam is
  plain maximum-likelihood decoding: it shows how much of a beam's gain needs no reward at all.

Calibration (``--calibrate``; 128 held-out prompts of ``task.prompts(160, seed=13)``, DPO
seeds 10, 11, 12; beam 8 vs greedy, pooled one-sided p): lr 3e-4 (v1's): 2 rounds, 24 tokens
0.918 -> 0.924 (p 0.15); 2 rounds, 32 tokens 0.919 -> 0.927 (p 0.10); 3 rounds 24 / 32 tokens
p 0.61 / 0.27; DPO beta 0.3: p 0.19. lr 1e-4: 2 rounds, 32 tokens 0.948 -> 0.963 (p 0.004,
gain in every seed); 1 round p 0.005; 3 rounds p 0.006; 24 tokens p 0.004; beta 0.3 p 0.005;
lr 5e-5 p 0.019. SFT alone: 0.954 -> 0.971 (p 0.020); 48 search tokens = 32. Chosen: lr 1e-4,
2 rounds, 32 tokens (smallest p among the rounds/tokens that train on no cut-off sample).
Seen there: lr 3e-4 DPO moves the policy away from SFT and LOWERS its greedy reward on held-out
prompts (0.954 -> 0.918); the beam's gain shrinks with that drift.

Evaluation (measured once, after the above was committed; 1 thread, this machine), task reward,
Q objective, pooled over DPO seeds 0-2, one-sided p vs greedy:
- PRIMARY (192 fresh prompts): beam 1 0.9516, 2 0.9568 (p 0.0066), 4 0.9563 (p 0.0047),
  8 0.9563 (p 0.0047; ratio 1.005; exact match 0.793 -> 0.821); per policy beam 8 vs greedy
  0.951 -> 0.959 (p 0.021), 0.950 -> 0.952 (p 0.041), 0.954 -> 0.958 (p 0.079). HOLDS.
- secondary (92 two-digit prompts): 0.874, 0.903 (p 0.012), 0.908 (p 0.012), 0.910 (p 0.009).
- SFT alone (beam = maximum-likelihood decoding, no reward): primary 0.9551 -> 0.9570 at beam 8
  (p 0.22; beam 2 0.9592, p 0.088); two-digit 0.877 -> 0.910 (p 0.049).
- DPO vs SFT (two-sided, paired): greedy 0.9516 vs 0.9551 (p 0.066); DPO beam 8 vs SFT beam 8
  0.9563 vs 0.9570 (p 0.73); two-digit 0.910 vs 0.910 (p 0.97). So the beam raises the DPO
  policies' reward, but DPO + beam is no better than the SFT model + the same beam: on this toy
  world the gain is that of likelihood search, not of the learned (implicit) reward.
- objective "reward" (implicit reward alone, eq. 23 without beta*log pi_ref): greedy 0.466,
  beam 8 0.145 (two-digit 0.181 -> 0.068): the search exploits the implicit reward (answers run
  to 30+ of 32 tokens, exact match 0); it needs the reference term.
Wall (192 prompts, 1 thread): greedy 0.3 s, beam 8 2.2 s per policy; DPO training 1.4 s each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DPO_SETTINGS = dict(rounds=2, prompts_per_round=32, k=4, epochs=2, batch_size=16, lr=1e-4, beta=0.1,
                    terminate=False)
TRAIN_MAX_NEW_TOKENS = 32  # > the longest toy answer (27 characters) + eos: no sample is cut off
SEARCH_MAX_NEW_TOKENS = 32
DPO_SEEDS = (0, 1, 2)
CALIBRATION_SEEDS = (10, 11, 12)


def dpo_policy(world, train_prompts, seed: int = 0, max_new_tokens: int = TRAIN_MAX_NEW_TOKENS, **settings):
    """The SFT policy after iterative DPO on toy-world preferences (see the module docstring);
    ``max_new_tokens`` caps the training samples, ``settings`` override ``DPO_SETTINGS``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.flows.online import policy_generator_factory, toy_reward
    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    tok = AutoTokenizer.from_pretrained(world.path)
    cfg = IterativeConfig(method="iterative-dpo", sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens),
                          seed=seed, **{**DPO_SETTINGS, **settings})
    reward = toy_reward(world.task)
    policy, _ = train_iterative(AutoModelForCausalLM.from_pretrained(world.path), tok, train_prompts,
                                policy_generator_factory("cpu"), cfg, reward_fn=reward,
                                eval_prompts=train_prompts[:8], eval_reward_fn=reward)
    return policy.eval(), tok


def train_prompt_texts(task) -> list[str]:
    return task.prompts(64, seed=11)


def calibration_prompt_texts(task) -> list[str]:
    """128 distinct held-out prompts (seed 13) for choosing the protocol."""
    train = set(train_prompt_texts(task))
    return [p for p in dict.fromkeys(task.prompts(160, seed=13)) if p not in train][:128]


def evaluation_prompt_texts(task, n: int = 192) -> list[str]:
    """The primary evaluation prompts: distinct, seed 14, none a training or calibration prompt."""
    seen = set(train_prompt_texts(task)) | set(calibration_prompt_texts(task))
    return [p for p in dict.fromkeys(task.prompts(400, seed=14)) if p not in seen][:n]


def two_digit_prompts(train_prompts) -> list:
    """Every "Spell out: n", n in 0..99, that is not among the training prompts."""
    from alignflow.trainers.encoding import as_messages, prompt_text_of

    seen = {prompt_text_of(p) for p in train_prompts}
    return [as_messages(f"Spell out: {n}") for n in range(100) if f"Spell out: {n}" not in seen]


def search_rewards(policy, ref, tok, task, prompts, widths, objective: str,
                   max_new_tokens: int = SEARCH_MAX_NEW_TOKENS) -> dict:
    """``{width: (task rewards [N] numpy, search scores [N], lengths [N], wall seconds)}``."""
    import numpy as np

    from alignflow.trainers.encoding import prompt_text_of
    from alignflow.trainers.token_rewards import beam_search_batch

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


def print_rows(runs: dict, widths) -> None:
    print(f"{'prompts':10s} {'policy':8s} {'objective':9s} {'beam':>4s} {'reward':>7s} {'ratio':>6s} {'exact':>6s} "
          f"{'score':>8s} {'len':>5s} {'changed':>7s} {'p':>8s} {'wall_s':>7s}")
    for (name, pol, objective), rs in runs.items():
        for r in rows_of(rs, widths):
            print(f"{name:10s} {pol:8s} {objective:9s} {r['beam']:4d} {r['reward']:7.4f} {r['ratio']:6.3f} "
                  f"{r['exact']:6.3f} {r['score']:8.4f} {r['len']:5.1f} {r['changed']:7d} {r['p']:8.2g} "
                  f"{r['wall_s']:7.2f}", flush=True)


def calibrate(world, ref, widths) -> None:
    """The calibration grid of the module docstring, on the calibration prompts only."""
    from alignflow.trainers.encoding import as_messages

    train = [as_messages(p) for p in train_prompt_texts(world.task)]
    cal = [as_messages(p) for p in calibration_prompt_texts(world.task)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.path)
    runs = {("cal", "sft", "q"): [search_rewards(ref, ref, tok, world.task, cal, widths, "q")]}
    grid = [dict(lr=3e-4, max_new_tokens=m, rounds=r) for m in (24, 32) for r in (2, 3)]
    grid += [dict(lr=3e-4, max_new_tokens=32, beta=0.3), dict(lr=1e-4, max_new_tokens=32, rounds=1),
             dict(lr=1e-4), dict(lr=1e-4, rounds=3), dict(lr=1e-4, max_new_tokens=24), dict(lr=5e-5),
             dict(lr=1e-4, beta=0.3)]
    for i, setting in enumerate(grid):
        print(f"setting {i}: {setting}", flush=True)
        runs[("cal", f"set-{i}", "q")] = [search_rewards(dpo_policy(world, train, s, **setting)[0], ref, tok, world.task,
                                                          cal, widths, "q") for s in CALIBRATION_SEEDS]
    print_rows(runs, widths)


def main() -> None:
    import numpy as np
    import torch
    from scipy.stats import ttest_rel
    from transformers import AutoModelForCausalLM

    from alignflow.flows.toy_world import build_toy_world
    from alignflow.trainers.encoding import as_messages

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "alignflow-bench-world"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--calibrate", action="store_true", help="run the calibration grid instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    world = build_toy_world(Path(args.world), seed=0)
    ref = AutoModelForCausalLM.from_pretrained(world.path).eval()
    if args.calibrate:
        return calibrate(world, ref, widths)
    train_prompts = [as_messages(p) for p in train_prompt_texts(world.task)]
    sets = {"eval": [as_messages(p) for p in evaluation_prompt_texts(world.task)],
            "two-digit": two_digit_prompts(train_prompts)}
    runs: dict = {}
    for seed in DPO_SEEDS:
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
            runs[(name, "dpo-all", objective)] = [r for s in DPO_SEEDS for r in runs[(name, f"dpo-{s}", objective)]]
    print_rows(runs, widths)
    print(", ".join(f"{name}: {len(p)} prompts" for name, p in sets.items()),
          "| p: one-sided paired t-test vs beam 1 over prompts (per-prompt mean over the DPO runs)")
    # DPO + search against SFT (paired over prompts, two-sided): does the DPO policy add anything?
    for name in sets:
        dpo = {w: np.mean([r[w][0] for r in runs[(name, "dpo-all", "q")]], 0) for w in (widths[0], widths[-1])}
        sft = {w: runs[(name, "sft", "q")][0][w][0] for w in (widths[0], widths[-1])}
        for a, b in ((widths[0], widths[0]), (widths[-1], widths[0]), (widths[-1], widths[-1])):
            print(f"{name}: DPO beam {a} {dpo[a].mean():.4f} vs SFT beam {b} {sft[b].mean():.4f}: "
                  f"p = {ttest_rel(dpo[a], sft[b]).pvalue:.2g} (two-sided)")


if __name__ == "__main__":
    main()
