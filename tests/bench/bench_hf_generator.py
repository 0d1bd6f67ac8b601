"""Benchmark: the ``hf`` backend against ``model.generate`` on the toy world, same run, same threads.

    python tests/bench/bench_hf_generator.py [--world DIR] [--prompts 64] [--k 4] [--threads 1]

(a) ``HFGenerator.generate`` (text + per-token log-probs) against (b) a bare loop around
``model.generate(do_sample=True, num_return_sequences=k, output_logits=True)`` over the same
left-padded prompts, log-probs computed from the returned logits, texts decoded. Both sample
their own tokens, so they stop at different lengths: the comparison is generated tokens per
second (eos counted, padding after it not). Runs alternate (a, b, a, b, ...), best of
``--repeats``; wall and CPU seconds of this process, and the peak resident memory each added.
Issue 16's goal: ours within 1.3x of the bare loop, i.e. tokens/s ratio (ours / bare) >= 0.77.
Then scoring: (c) ``HFGenerator.score_batch`` against (d) one unbatched forward per pair.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import PeakRSS, machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", default=os.environ.get("ALIGNFLOW_BENCH_WORLD",
                                                           str(Path(tempfile.gettempdir()) / "alignflow-bench-world")))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine_line(), flush=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.flows.toy_world import build_toy_world
    from alignflow.schemas.generator import SamplingParams

    torch.set_num_threads(args.threads)
    world = build_toy_world(args.world, seed=0)
    model = AutoModelForCausalLM.from_pretrained(world.path).eval()
    tok = AutoTokenizer.from_pretrained(world.path)
    prompts = world.task.prompts(args.prompts, seed=5)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    ours = HFGenerator(model, tok, device="cpu", batch_size=args.prompts * args.k, num_threads=args.threads)
    n_samples = args.prompts * args.k

    def run_ours(seed):
        gens = ours.generate(messages, n=args.k, sampling=SamplingParams(max_new_tokens=args.max_new_tokens, seed=seed))
        return sum(g.n_tokens for gs in gens for g in gs)

    def run_baseline(seed):
        tok.padding_side = "left"
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=args.k, max_new_tokens=args.max_new_tokens,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out.sequences[:, enc["input_ids"].shape[1]:]
            logits = torch.stack(out.logits, dim=1).float()  # [N, T, V]
            token_logps = logits.log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
            alive = torch.ones_like(new, dtype=torch.bool)  # up to and including the first eos
            alive[:, 1:] = (new[:, :-1] != tok.eos_token_id).cumprod(-1).bool()
            (token_logps * alive).sum(-1).tolist()
        tok.batch_decode(new, skip_special_tokens=True)
        return int(alive.sum())

    run_ours(0), run_baseline(0)  # warm-up
    best = {name: {"wall": float("inf"), "cpu": float("inf"), "tps": 0.0, "tps_cpu": 0.0, "mem": 0.0}
            for name in ("hf backend", "model.generate")}
    for r in range(args.repeats):  # alternating: load drifts hit both alike
        for name, fn in (("hf backend", run_ours), ("model.generate", run_baseline)):
            w, c = time.perf_counter(), time.process_time()
            with PeakRSS() as mem:
                tokens = fn(r + 1)
            w, c = time.perf_counter() - w, time.process_time() - c
            b = best[name]
            b.update(wall=min(b["wall"], w), cpu=min(b["cpu"], c), tps=max(b["tps"], tokens / w),
                     tps_cpu=max(b["tps_cpu"], tokens / c), mem=max(b["mem"], mem.added), tokens=tokens)
    print(f"generate {n_samples} samples (<= {args.max_new_tokens} tokens, {args.threads} thread(s)), "
          f"best of {args.repeats}, alternating:")
    for name, b in best.items():
        print(f"  {name:<15} {b['wall']:7.3f} s wall {b['cpu']:7.3f} s cpu  {b['tps']:8.0f} tokens/s "
              f"{b['tps_cpu']:8.0f} tokens/CPU-s  ({b['tokens']} tokens last run)  +{b['mem']:.0f} MB peak RSS")
    o, base = best["hf backend"], best["model.generate"]
    print(f"  tokens/s ours / model.generate: {o['tps'] / base['tps']:.2f} wall, {o['tps_cpu'] / base['tps_cpu']:.2f} CPU "
          f"(goal >= {1 / 1.3:.2f}: within 1.3x)")

    gens = ours.generate(messages, n=args.k, sampling=SamplingParams(max_new_tokens=args.max_new_tokens, seed=0))
    pairs_p = [m for m, g in zip(messages, gens) for _ in g]
    pairs_c = [x.text for g in gens for x in g]

    def run_score():
        return ours.score_batch(pairs_p, pairs_c)

    def run_naive():
        scores = []
        with torch.inference_mode():
            for m, c in zip(pairs_p, pairs_c):
                p_ids = ours.prompt_ids(m)
                c_ids = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + c_ids])
                lp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                scores.append(float(lp[len(p_ids) - 1:].gather(-1, ids[0, len(p_ids):, None]).sum()))
        return scores

    a, b = run_score(), run_naive()
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    times = {"score_batch": float("inf"), "one-by-one": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("score_batch", run_score), ("one-by-one", run_naive)):
            c = time.process_time()
            fn()
            times[name] = min(times[name], time.process_time() - c)
    print(f"score {len(pairs_c)} (prompt, continuation) pairs (CPU s):")
    for name, t in times.items():
        print(f"  {name:<15} {t:7.3f} s")
    print(f"  ratio batched/one-by-one time: {times['score_batch'] / times['one-by-one']:.2f}")


if __name__ == "__main__":
    main()
