"""TDPO's reference: a live model during training, or per-token distributions stored beside the data?

    PYTHONPATH=$PWD python tests/bench/bench_tdpo_reference.py [--world DIR] [--threads 1] [--repeats 3]

On the toy world (built or reused under --world): 64 prompts, K = 4 samples of the SFT model,
scored with the task reward, best vs worst (the pairs ``alignflow rejection-sample`` makes).
Measured in one process, same data, same settings (batch 16, 3 epochs, 1 thread):

1. DPO with cached reference columns (``precompute-ref``; the reference is never loaded): the
   baseline of the summary losses;
2. TDPO (tdpo2) with the reference model loaded for training (what ``PreferenceTrainer`` does);
3. the alternative's storage: the reference's next-token distribution at every response token,
   float32 ``[tokens, V]``, written as zstd Parquet (one list<float> per token), with its size
   and write time, and the same per response token at real vocabulary sizes.

Training time is the best of ``--repeats`` runs of each (the machine is shared).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "alignflow-bench-world"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.flows.toy_world import build_toy_world
    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.logprobs import build_sequence_batch
    from alignflow.trainers.precompute import fill_reference_logps
    from alignflow.trainers.preference import PreferenceTrainer
    from alignflow.trainers.sample_data import pairwise_from_samples
    from alignflow.trainers.token_level import target_logits

    world = build_toy_world(a.world, seed=0)
    tok = AutoTokenizer.from_pretrained(world.path)
    sft = AutoModelForCausalLM.from_pretrained(world.path)
    prompts = world.task.prompts(64, seed=7)
    out = HFGenerator(sft, tok, device="cpu", batch_size=256).generate(
        [[{"role": "user", "content": p}] for p in prompts], n=4,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=40, seed=0))
    responses = [[g.text for g in gs] for gs in out]
    rewards = [world.task.rewards([p] * 4, r).tolist() for p, r in zip(prompts, responses)]
    table = pairwise_from_samples(prompts, responses, rewards)
    examples = pretokenize(table, "pairwise", tok)
    fill_reference_logps(sft, examples, tok.pad_token_id)  # DPO's cached columns

    def train(loss: str, params: dict) -> float:
        best = float("inf")
        for _ in range(a.repeats):
            model = AutoModelForCausalLM.from_pretrained(world.path)
            args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16, num_train_epochs=3,
                                     learning_rate=2e-4, report_to=[], save_strategy="no", logging_steps=100,
                                     use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
            trainer = PreferenceTrainer(model, args, [dict(e) for e in examples], kind="pairwise", loss=loss,
                                        loss_params=params, processing_class=tok)
            start = time.perf_counter()
            trainer.train()
            best = min(best, time.perf_counter() - start)
        return best

    t_dpo = train("dpo", {})
    t_tdpo = train("tdpo", {"variant": "tdpo2"})
    n_tokens = sum(len(r) for e in examples for r in e["response_ids"])
    vocab = sft.config.vocab_size
    print(f"data: {len(examples)} pairs, {n_tokens} response tokens, V = {vocab}, "
          f"{sum(p.numel() for p in sft.parameters()):,} parameters")
    print(f"train 3 epochs: dpo (cached ref columns) {t_dpo:.2f} s, tdpo2 (live reference) {t_tdpo:.2f} s, "
          f"ratio {t_tdpo / t_dpo:.2f}")

    # the alternative: every next-token distribution of the reference over the responses
    start = time.perf_counter()
    rows = []
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            chunk = examples[i:i + 32]
            seqs = build_sequence_batch([e["prompt_ids"] for e in chunk], [e["response_ids"] for e in chunk],
                                        tok.pad_token_id)
            rows.append(torch.softmax(target_logits(sft, seqs), -1).numpy().astype(np.float32))
    probs = np.concatenate(rows)
    path = Path(tempfile.mkdtemp()) / "per_token.parquet"
    flat = pa.array(probs.reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, vocab)
    pq.write_table(pa.table({"ref_token_probs": column}), path, compression="zstd")
    elapsed = time.perf_counter() - start
    raw = probs.nbytes
    data_bytes = table.nbytes
    print(f"per-token storage: {raw / 1e6:.2f} MB float32 in memory, {path.stat().st_size / 1e6:.2f} MB zstd Parquet "
          f"(written in {elapsed:.2f} s); the pairs themselves {data_bytes / 1e3:.1f} KB")
    for v in (32_000, 128_256, 151_936):
        print(f"  at V = {v:,}: {4 * v / 1e3:.0f} KB per response token; a pair of two 400-token responses "
              f"{800 * 4 * v / 1e6:.0f} MB; 10k such pairs {1e4 * 800 * 4 * v / 1e12:.2f} TB")


if __name__ == "__main__":
    main()
