"""GPU benchmark (issue 16, goal 4): ``alignflow train --loss dpo`` against TRL's DPOTrainer on a
GPU-sized model, whole processes, plus the model FLOPs utilisation (MFU) of our training.

The model is built from a config (Qwen2-shaped like Qwen2.5-0.5B: 24 layers, hidden 896, 14
heads / 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings; 494 M parameters),
randomly initialised and saved in bf16; both sides load that checkpoint and train with
``bf16=True``. Data: ``--pairs`` synthetic pairs whose prompt + response is about 1,024 tokens
(char-level tokenizer: 400-character prompts, 600-character responses), ``--batch`` pairs a
step, one epoch, lr 5e-7, beta 0.1. TRL runs with its defaults (``DPOConfig``: gradient
checkpointing on, max_length 1024, so no row is cut).

Configurations, alternating, best of ``--repeats``: ``ours`` (train on reference columns),
``ours_pre`` (precompute-ref process + train process), ``trl`` (reference forward every step),
``trl_pre`` (precompute_ref_log_probs=True). Reported per configuration: wall and CPU seconds of
the process(es), peak host RSS and peak GPU memory reserved by torch (printed by each process at
exit). MFU = useful model FLOPs of the epoch / (train_runtime x peak bf16 FLOP/s of the device),
the useful FLOPs counted once per token a step needs (each prompt once, both responses:
``training_flops``), the same numerator for TRL (its extra work - second prompt copy, reference
forward, recomputation - is overhead, not useful FLOPs).

Without a CUDA device it prints SKIPPED and exits 0: nothing is measured or estimated.

    bash tests/gpu.sh                      # the GPU tests, then this benchmark
    python tests/bench/bench_dpo_gpu.py --pairs 512 --batch 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PROMPT_CHARS, RESPONSE_CHARS, LR, BETA = 400, 600, 5e-7, 0.1
QWEN2_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
             "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
# dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
CONFIGS = ("ours", "ours_pre", "trl", "trl_pre")


# ---- FLOP arithmetic (tested on the CPU: tests/test_bench_gpu.py) -------------------------------------

def model_shape(model) -> dict:
    """What the FLOP count needs: parameters of the matrix multiplies per token (every 2-D
    weight except embeddings and the LM head), attention width (heads x head size), layers,
    hidden size and vocabulary."""
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed" not in n and "lm_head" not in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"body_params": body, "attn_width": cfg.num_attention_heads * head_dim, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}


def training_flops(shape: dict, prompt_len: int, response_lens: list[int], attended: str = "causal") -> float:
    """FLOPs of one training step's forward + backward (3x the forward) for one example laid out
    as ``trainers.logprobs`` packs it: the prompt once, then each response seeing the prompt and
    itself. Forward = 2 x body_params per token + 2 x hidden x vocab per predicted token (the LM
    head runs on response targets only) + 4 x attn_width per (query, key) pair attended in each
    layer. ``attended="causal"`` counts the pairs the mask allows (useful work);
    ``"dense"`` counts every pair of the row, what a kernel ignoring the mask computes."""
    tokens = prompt_len + sum(response_lens)
    targets = sum(response_lens)
    if attended == "dense":
        pairs = tokens * tokens
    else:
        pairs = prompt_len * (prompt_len + 1) // 2 + sum(r * prompt_len + r * (r + 1) // 2 for r in response_lens)
    forward = (2 * shape["body_params"] * tokens + 2 * shape["hidden"] * shape["vocab"] * targets
               + 4 * shape["attn_width"] * shape["layers"] * pairs)
    return 3.0 * forward


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved useful FLOP/s over the device's peak."""
    return flops / seconds / peak


def peak_flops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


# ---- data and processes -----------------------------------------------------------------------------

def prepare(workdir: Path, pairs: int) -> None:
    import pyarrow as pa
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignflow.schemas.store import write_dataset
    from alignflow.trainers.toy_model import make_char_tokenizer

    tok = make_char_tokenizer(model_max_length=2048)
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_05B, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(workdir / "model")
    tok.save_pretrained(workdir / "model")
    rng = random.Random(0)
    alphabet = string.ascii_lowercase + "     "

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    rows = [{"prompt": text(PROMPT_CHARS), "chosen": text(RESPONSE_CHARS), "rejected": text(RESPONSE_CHARS)}
            for _ in range(pairs)]
    (workdir / "pairs.json").write_text(json.dumps(rows))
    table = pa.table({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})
    table = table.append_column("margin", pa.nulls(pairs, pa.float64())).append_column("source", pa.array(["rule"] * pairs))
    write_dataset(workdir / "pairs", table, "pairwise", {"flow": "bench_dpo_gpu"}, overwrite=True)


def run_measured(cmd: list[str]) -> dict:
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        out = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    gpu = [float(line.split()[1]) for line in out.splitlines() if line.startswith("GPU_PEAK_MB ")]
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_MB": usage.ru_maxrss / 1024,
            "gpu_MB": max(gpu, default=float("nan")), "output": out}


def ours_cli(*args) -> list[str]:
    """The alignflow CLI, run as its own process, reporting its peak GPU memory at exit."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", "cli", "--", *map(str, args)]


def run_config(name: str, workdir: Path, batch: int) -> dict:
    out = workdir / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)
    if name.startswith("ours"):
        runs = []
        data = workdir / "pairs_ref"
        if name == "ours_pre":
            data = workdir / "pairs_ref_pre"
            shutil.rmtree(data, ignore_errors=True)
            runs.append(run_measured(ours_cli("precompute-ref", workdir / "pairs", "--model", workdir / "model",
                                              "--output", data, "--batch-size", batch)))
        runs.append(run_measured(ours_cli("train", data, "--model", workdir / "model", "--loss", "dpo", "--param",
                                          f"beta={BETA}", "--output", out, "--per_device_train_batch_size", batch,
                                          "--num_train_epochs", 1, "--learning_rate", LR, "--logging_steps", 10,
                                          "--disable_tqdm", "true", "--bf16", "true")))
        record = json.loads((out / "alignflow_train.json").read_text())
        train_s, loss = record["train_runtime_s"], record["train_loss"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "trl", "--workdir", str(workdir),
               "--out", str(out), "--batch", str(batch)] + ["--precompute"] * (name == "trl_pre")
        runs = [run_measured(cmd)]
        result = next(json.loads(line[13:]) for line in runs[0]["output"].splitlines() if line.startswith("BENCH_RESULT "))
        train_s, loss = result["train_s"], result["loss"]
    return {"wall_s": sum(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs),
            "rss_MB": max(r["rss_MB"] for r in runs), "gpu_MB": max(r["gpu_MB"] for r in runs),
            "train_s": train_s, "loss": loss}


def worker_cli(argv: list[str]) -> None:
    import atexit

    import torch

    atexit.register(lambda: print(f"GPU_PEAK_MB {torch.cuda.max_memory_reserved() / 2**20:.0f}", flush=True))
    from alignflow.flows.cli import app

    app(argv, prog_name="alignflow")


def worker_trl(workdir: Path, out: Path, batch: int, precompute: bool) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = json.loads((workdir / "pairs.json").read_text())
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR,
                     beta=BETA, logging_steps=10, report_to="none", save_strategy="no", disable_tqdm=True,
                     precompute_ref_log_probs=precompute)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    trainer.save_model(str(out))
    print(f"GPU_PEAK_MB {torch.cuda.max_memory_reserved() / 2**20:.0f}")
    print("BENCH_RESULT " + json.dumps({"train_s": result.metrics["train_runtime"], "loss": result.training_loss}))


def epoch_flops(workdir: Path) -> tuple[float, dict]:
    """Useful training FLOPs of one epoch (``training_flops`` summed over the examples)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from alignflow.schemas.store import read_dataset
    from alignflow.trainers.collators import pretokenize

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(workdir / "model"))
    shape = model_shape(model)
    tok = AutoTokenizer.from_pretrained(workdir / "model")
    examples = pretokenize(read_dataset(workdir / "pairs"), "pairwise", tok)
    total = sum(training_flops(shape, len(e["prompt_ids"]), [len(r) for r in e["response_ids"]]) for e in examples)
    lengths = [len(e["prompt_ids"]) + len(r) for e in examples for r in e["response_ids"]]
    return total, {**shape, "max_prompt_plus_response": max(lengths)}


def report(results: dict[str, list[dict]], flops: float, peak: float | None) -> list[str]:
    """The summary lines: best of the repeats per configuration and measure, MFU of each from its
    ``train_runtime``, ours / TRL ratios of wall time, train time and peak GPU memory beside the
    goals (<= 0.5 without precompute, <= 0.8 with it, memory <= 1.2), and our MFU (>= 40%)."""
    best = {c: {k: min(r[k] for r in rs) for k in ("wall_s", "train_s", "cpu_s", "rss_MB", "gpu_MB")}
            for c, rs in results.items() if rs}
    repeats = max((len(rs) for rs in results.values()), default=0)
    lines = [f"\nbest of {repeats}",
             f"{'config':<10}{'wall_s':>9}{'train_s':>9}{'cpu_s':>9}{'rss_MB':>9}{'gpu_MB':>9}{'MFU':>7}"]
    for c, r in best.items():
        util = f"{mfu(flops, r['train_s'], peak):.1%}" if peak else "n/a"
        lines.append(f"{c:<10}{r['wall_s']:>9.1f}{r['train_s']:>9.1f}{r['cpu_s']:>9.1f}{r['rss_MB']:>9.0f}"
                     f"{r['gpu_MB']:>9.0f}{util:>7}")
    for ours, base, goal in (("ours", "trl", 0.5), ("ours_pre", "trl_pre", 0.8)):
        if ours in best and base in best:
            o, b = best[ours], best[base]
            wall, mem = o["wall_s"] / b["wall_s"], o["gpu_MB"] / b["gpu_MB"]
            met = "met" if wall <= goal and mem <= 1.2 else "NOT met"
            lines.append(f"{ours} / {base}: wall {wall:.2f} (goal <= {goal}), train {o['train_s'] / b['train_s']:.2f}, "
                         f"gpu memory {mem:.2f} (<= 1.2): {met}")
    if "ours" in best and peak:
        util = mfu(flops, best["ours"]["train_s"], peak)
        lines.append(f"MFU of our training (useful FLOPs / train_runtime / peak): {util:.1%} "
                     f"(goal >= 40% on an H200-class GPU): {'met' if util >= 0.4 else 'NOT met'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["cli", "trl"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--precompute", action="store_true")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--peak-tflops", type=float, help="The device's dense bf16 peak, if not in the built-in table.")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    opts = ap.parse_args()
    if opts.worker == "cli":
        return worker_cli([a for a in opts.rest if a != "--"])
    if opts.worker == "trl":
        return worker_trl(opts.workdir, opts.out, opts.batch, opts.precompute)

    import torch

    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device; goal 4 of issue 16 needs a GPU (nothing measured, nothing estimated)")
        return
    configs = [c for c in opts.only.split(",") if c]
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed here (pip install '.[bench]'): measuring ours only, no ratios")
        configs = [c for c in configs if c.startswith("ours")]
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, opts.peak_tflops * 1e12 if opts.peak_tflops else None)
    load = os.getloadavg()
    print(f"device {name}, peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s; host load {load[0]:.2f}; "
          f"{opts.pairs} pairs, batch {opts.batch}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-gpu-"))
    prepare(workdir, opts.pairs)
    flops, shape = epoch_flops(workdir)
    print(f"model {shape}; useful training FLOPs of the epoch {flops:.3e}", flush=True)
    pre = run_measured(ours_cli("precompute-ref", workdir / "pairs", "--model", workdir / "model",
                                "--output", workdir / "pairs_ref", "--batch-size", opts.batch))
    print(f"(setup) precompute-ref: {pre['wall_s']:.1f} s", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for rep in range(opts.repeats):
        for c in configs:
            r = run_config(c, workdir, opts.batch)
            results[c].append(r)
            print(f"[{rep}] {c:<9} wall {r['wall_s']:7.1f} s  train {r['train_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                  f"rss {r['rss_MB']:6.0f} MB  gpu {r['gpu_MB']:7.0f} MB  loss {r['loss']:.4f}", flush=True)
    print("\n".join(report(results, flops, peak)))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
