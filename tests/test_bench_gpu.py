"""The GPU benchmark's arithmetic on the CPU (tests/bench/bench_dpo_gpu.py, issue 16 goal 4): the
training FLOP count against torch's FLOP counter on a tiny Qwen2, MFU, and that without a CUDA
device the benchmark says SKIPPED instead of measuring anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent / "bench" / "bench_dpo_gpu.py"
sys.path.insert(0, str(BENCH.parent))

from bench_dpo_gpu import mfu, model_shape, peak_flops, report, training_flops  # noqa: E402


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.config._attn_implementation = "eager"  # attention as matmuls, which the FLOP counter sees
    return model


@pytest.mark.parametrize("prompt,responses", [(10, [7, 4]), (3, [12, 1]), (25, [5, 9])])
def test_training_flops_match_torch_flop_counter(prompt, responses):
    """Forward + backward of our packed log-prob pass, every matmul counted by torch: equal to
    ``training_flops(..., attended="dense")`` (eager attention computes every (query, key) pair
    of the row and masks afterwards)."""
    from torch.utils.flop_counter import FlopCounterMode

    from alignflow.trainers.logprobs import build_sequence_batch, sequence_logps

    model = tiny_qwen2()
    batch = build_sequence_batch([[1] * prompt], [[[5] * r for r in responses]], 0, "packed")
    with FlopCounterMode(display=False) as counter:
        logps, _ = sequence_logps(model, batch)
        logps.sum().backward()
    shape = model_shape(model)
    assert shape["body_params"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 160 * 3)  # q, o, k, v (2 kv heads), MLP
    assert counter.get_total_flops() == training_flops(shape, prompt, responses, attended="dense")
    useful = training_flops(shape, prompt, responses)
    pairs = prompt * (prompt + 1) // 2 + sum(r * prompt + r * (r + 1) // 2 for r in responses)
    tokens = prompt + sum(responses)
    assert training_flops(shape, prompt, responses, "dense") - useful == 3 * 4 * 64 * 2 * (tokens * tokens - pairs)


def test_mfu_and_device_peaks():
    assert mfu(4.0e15, 10.0, 1.0e15) == pytest.approx(0.4)
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some New GPU") is None and peak_flops("Some New GPU", 5e14) == 5e14


def _run(wall, train, gpu, cpu=1.0, rss=100.0):
    return {"wall_s": wall, "train_s": train, "cpu_s": cpu, "rss_MB": rss, "gpu_MB": gpu, "loss": 0.69}


def test_report_takes_the_best_of_each_measure_and_states_the_goals():
    """Best of the repeats per measure (not per run), ratios ours / TRL with the goals, MFU from
    train_runtime, and 'NOT met' when memory is over 1.2x even if time is under the goal."""
    results = {"ours": [_run(50.0, 40.0, 900.0), _run(45.0, 42.0, 1000.0)],
               "ours_pre": [_run(70.0, 40.0, 2000.0)],
               "trl": [_run(100.0, 90.0, 1000.0), _run(110.0, 80.0, 1000.0)],
               "trl_pre": [_run(100.0, 60.0, 1000.0)]}
    lines = report(results, flops=4.0e15, peak=1.0e14)
    assert "best of 2" in lines[0]
    ours_row = next(line for line in lines if line.startswith("ours "))
    assert ours_row.split() == ["ours", "45.0", "40.0", "1.0", "100", "900", "100.0%"]  # 4e15 / 40 s / 1e14
    ratio = next(line for line in lines if line.startswith("ours / trl:"))
    assert "wall 0.45 (goal <= 0.5)" in ratio and "train 0.50" in ratio and "gpu memory 0.90" in ratio
    assert ratio.endswith(": met")
    pre = next(line for line in lines if line.startswith("ours_pre / trl_pre:"))
    assert "wall 0.70 (goal <= 0.8)" in pre and "gpu memory 2.00" in pre and pre.endswith("NOT met")
    assert lines[-1].startswith("MFU of our training") and "100.0%" in lines[-1] and lines[-1].endswith(": met")
    assert report(results, 4.0e15, None)[2].endswith("n/a")  # unknown device: no MFU, no MFU line
    assert not any(line.startswith("MFU") for line in report(results, 4.0e15, None))
    slow = report({"ours": [_run(10.0, 1000.0, 1.0)]}, 4.0e15, 1.0e14)
    assert slow[-1].endswith("NOT met") and "4.0%" in slow[-1] and not any(line.startswith("ours / ") for line in slow)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_benchmark_is_skipped_without_cuda():
    out = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("SKIPPED: no CUDA device"), out.stdout
    assert "MFU" not in out.stdout
