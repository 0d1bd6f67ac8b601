"""Reward before/after per method family on both embedded worlds, with the reward-rises tests'
protocols (tests/test_trainer_toy.py for the offline families, tests/test_online.py for RLOO and
Nash-MD), so the numbers are those the tests assert on.

    python tests/bench/bench_worlds.py [--worlds DIR] [--out results.json]

Per (world, family): held-out reward of the SFT policy (the baseline, measured in the same run
with the same prompts and sampling seeds), after training, and the one-sided paired t-test p.
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

OFFLINE = {  # family: (data, loss, params, lr), as tests/test_trainer_toy.py
    "pairwise with reference": ("pairwise", "dpo", {}, 2e-4),
    "reference-free": ("pairwise", "orpo", {}, 2e-4),
    "listwise": ("listwise", "lipo", {}, 2e-4),
    "binary": ("binary", "kto", {}, 2e-4),
}


def offline(world, workdir: Path) -> list[dict]:
    import torch
    from scipy import stats
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.preference import PreferenceTrainer
    from tests import test_trainer_toy as t

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(world.path)
    sft = AutoModelForCausalLM.from_pretrained(world.path)
    loaded = (world, tok, sft)
    prompts = world.task.prompts(t.N_TRAIN_PROMPTS, seed=7)
    responses = t._sample(sft, tok, prompts, t.K, seed=0)
    rewards = [world.task.rewards([p] * t.K, r).tolist() for p, r in zip(prompts, responses)]
    tables = t.datasets((prompts, responses, rewards))
    before = t.eval_rewards(loaded, sft)
    rows = []
    for family, (data, loss, params, lr) in OFFLINE.items():
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(world.path)
        args = TrainingArguments(output_dir=str(workdir / loss), per_device_train_batch_size=16, num_train_epochs=3,
                                 learning_rate=lr, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                 logging_steps=1000, use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
                                 seed=0)
        PreferenceTrainer(model, args, pretokenize(tables[data], data, tok), kind=data, loss=loss, loss_params=params,
                          processing_class=tok).train()
        after = t.eval_rewards(loaded, model)
        rows.append({"family": family, "method": loss, "before": float(before.mean()), "after": float(after.mean()),
                     "p": float(stats.ttest_rel(after, before, alternative="greater").pvalue),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    return rows


def online(world, name: str) -> list[dict]:
    import torch
    from scipy import stats

    from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md
    from alignflow.trainers.online.rloo import RLOOConfig, train_rloo
    from tests.test_online import SAMPLING, toy_env

    torch.set_num_threads(2)
    env = toy_env(world)
    runs = {
        ("online RL", "rloo"): lambda: train_rloo(
            env.policy(), env.tok, env.prompts, env.make_gen, env.reward,
            RLOOConfig(steps=10, prompts_per_step=16, k=4, lr=3e-4, beta=0.0, sampling=SAMPLING),
            eval_prompts=env.eval_prompts)[1],
        ("Nash", "nash-md"): lambda: train_nash_md(
            env.policy(), env.tok, env.prompts, env.make_gen, env.preference,
            NashMDConfig(steps=15 if name == "bpe" else 10, prompts_per_step=16, lr=3e-4, sampling=SAMPLING),
            eval_prompts=env.eval_prompts, eval_reward_fn=env.reward)[1],
    }
    rows = []
    for (family, method), run in runs.items():
        started = time.perf_counter()
        report = run()
        before, after = report.extra["eval_rewards_before"], report.extra["eval_rewards_after"]
        rows.append({"family": family, "method": method, "before": report.reward_before, "after": report.reward_after,
                     "p": float(stats.ttest_rel(after, before, alternative="greater").pvalue),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=Path, default=None, help="folder for the built worlds (reused when built)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    from alignflow.flows.worlds import WORLDS, build_embedded_world

    base = args.worlds or Path(tempfile.mkdtemp(prefix="bench-worlds-"))
    results = []
    with tempfile.TemporaryDirectory() as work:
        for name in WORLDS:
            world = build_embedded_world(name, base / name, seed=0)
            for row in offline(world, Path(work) / name) + online(world, name):
                results.append({"world": name, **row})
    print(f"\n{'family':24} {'method':8} {'world':5} {'before':>7} {'after':>7} {'p':>9}")
    for r in sorted(results, key=lambda r: (r["family"], r["world"])):
        print(f"{r['family']:24} {r['method']:8} {r['world']:5} {r['before']:7.3f} {r['after']:7.3f} {r['p']:9.2g}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
