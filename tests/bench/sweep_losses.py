"""Every per-sequence loss of ``trainers.losses`` on the toy world with the same budget.

Data: K samples per prompt from the SFT toy model, scored by the task's reward, as pairwise,
listwise and binary datasets (NPO gets the undesirable rows only). Every loss trains a fresh copy
of the SFT model for the same number of optimizer steps, batch size and learning rate. Then, on
fixed held-out prompts with a fixed sampling seed:

- reward gain: mean reward of the policy's samples minus that of the SFT model's samples,
- KL to the reference: Monte-Carlo KL(pi || pi_ref) = mean over the policy's samples of
  log pi(y|x) - log pi_ref(y|x) (sequence log-probs, ``trainers.logprobs``).

Prints a table and writes a PNG plot of reward against KL.

    python tests/bench/sweep_losses.py --steps 12 --out sweep.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's packages

EXCLUDED = {  # not per-sequence losses (token-level: tests/test_trainer_token_level.py; dro, bt: their own trainers)
    "tdpo": "per-token vocabulary log-probs", "cringe": "top-k logits", "dro": "value head", "nn": "two references",
    "bt": "a reward model's scores (reward-model loss)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path(tempfile.gettempdir()) / "alignflow-sweep-world")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--losses", default="", help="Comma-separated subset (default: every supported loss).")
    ap.add_argument("--out", type=Path, default=Path("sweep_losses.png"))
    ap.add_argument("--threads", type=int, default=1)
    opts = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.flows.toy_world import build_toy_world
    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.collators import pretokenize, tokenize_prompts_responses
    from alignflow.trainers.logprobs import build_sequence_batch, sequence_logps
    from alignflow.trainers.losses import LOSSES, loss_spec
    from alignflow.trainers.preference import PreferenceTrainer
    from alignflow.trainers.sample_data import binary_from_samples, listwise_from_samples, pairwise_from_samples

    hf_logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    world = build_toy_world(opts.world, seed=0)
    task = world.task
    tok = AutoTokenizer.from_pretrained(world.path)
    sft = AutoModelForCausalLM.from_pretrained(world.path)

    def sample(model, prompts, n, seed):
        gen = HFGenerator(model, tok, device="cpu", batch_size=256)
        out = gen.generate([[{"role": "user", "content": p}] for p in prompts], n=n,
                           sampling=SamplingParams(temperature=1.0, max_new_tokens=40, seed=seed))
        return [[g.text for g in gs] for gs in out]

    start = time.perf_counter()
    prompts = task.prompts(opts.prompts, seed=7)
    responses = sample(sft, prompts, opts.k, seed=0)
    rewards = [task.rewards([p] * opts.k, r).tolist() for p, r in zip(prompts, responses)]
    data = {
        "pairwise": pairwise_from_samples(prompts, responses, rewards),
        "listwise": listwise_from_samples(prompts, responses, rewards),
        "binary": binary_from_samples(prompts, responses, rewards),
        "negative": binary_from_samples(prompts, responses, rewards, only=False),
    }
    eval_prompts = task.prompts(opts.eval_prompts, seed=99)

    @torch.no_grad()
    def evaluate(model):
        resp = sample(model, eval_prompts, 2, seed=123)
        reward = float(np.mean([task.rewards([p] * 2, r).mean() for p, r in zip(eval_prompts, resp)]))
        p_ids, r_ids = tokenize_prompts_responses(tok, eval_prompts, resp)
        batch = build_sequence_batch(p_ids, r_ids, tok.pad_token_id)
        lp, _ = sequence_logps(model.eval(), batch)
        ref, _ = sequence_logps(sft.eval(), batch)
        return reward, float((lp - ref).mean())

    base_reward, _ = evaluate(sft)
    print(f"SFT reward {base_reward:.3f}; data: " + ", ".join(f"{k} {v.num_rows}" for k, v in data.items())
          + f"; {time.perf_counter() - start:.0f} s")
    chosen = [x for x in opts.losses.split(",") if x] or [n for n in LOSSES if n not in EXCLUDED]
    rows = []
    for name in chosen:
        spec = loss_spec(name)
        kinds = ["pairwise", "listwise", "binary"] if spec.kind == "any" else spec.kind.split(" or ")
        kind = kinds[0]
        table = data["negative"] if name == "npo" else data[kind]
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(world.path)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=opts.batch,
                                 max_steps=opts.steps, learning_rate=opts.lr, lr_scheduler_type="constant",
                                 report_to=[], save_strategy="no", logging_steps=opts.steps, use_cpu=True,
                                 disable_tqdm=True, dataloader_pin_memory=False, seed=0)
        try:
            trainer = PreferenceTrainer(model, args, pretokenize(table, kind, tok), kind=kind, loss=name,
                                        processing_class=tok)
            trainer.train()
            reward, kl = evaluate(model)
            rows.append({"loss": name, "kind": kind, "reward": reward, "gain": reward - base_reward, "kl": kl,
                         "seconds": time.perf_counter() - t0})
        except Exception as exc:  # a loss that cannot run here is reported, not fatal to the sweep
            rows.append({"loss": name, "kind": kind, "error": f"{type(exc).__name__}: {exc}"[:120]})
        r = rows[-1]
        print(f"{name:<14} {kind:<9} " + (f"gain {r['gain']:+.3f}  KL {r['kl']:8.3f}  {r['seconds']:.0f} s"
                                          if "error" not in r else r["error"]), flush=True)

    print(f"\n{'loss':<14}{'kind':<10}{'reward':>8}{'gain':>8}{'KL(pi||ref)':>13}")
    for r in sorted((r for r in rows if "error" not in r), key=lambda r: -r["gain"]):
        print(f"{r['loss']:<14}{r['kind']:<10}{r['reward']:>8.3f}{r['gain']:>+8.3f}{r['kl']:>13.3f}")
    for name, why in EXCLUDED.items():
        print(f"{name:<14}not in the sweep: needs {why}")
    ok = [r for r in rows if "error" not in r]
    if ok:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 6))
        colors = {"pairwise": "tab:blue", "listwise": "tab:green", "binary": "tab:red"}
        for r in ok:
            ax.scatter(r["kl"], r["gain"], color=colors.get(r["kind"], "k"))
            ax.annotate(r["loss"], (r["kl"], r["gain"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("KL(pi || pi_ref), nats per sample (Monte-Carlo)")
        ax.set_ylabel(f"reward gain over SFT ({base_reward:.3f})")
        ax.set_title(f"toy world: {opts.steps} steps x batch {opts.batch}, lr {opts.lr}")
        fig.tight_layout()
        fig.savefig(opts.out, dpi=120)
        print(f"plot: {opts.out}")
    opts.out.with_suffix(".json").write_text(json.dumps({"sft_reward": base_reward, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
