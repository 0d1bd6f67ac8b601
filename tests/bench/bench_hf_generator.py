"""Benchmark: the ``hf`` backend against ``model.generate`` on the toy world, same run, same threads.

    python tests/bench/bench_hf_generator.py [--world DIR] [--prompts 64] [--k 4] [--threads 1]

Prints samples/s of (a) ``HFGenerator.generate`` (text + per-token log-probs) and (b) the baseline
``model.generate(do_sample=True, num_return_sequences=k, output_logits=True)`` over the same
left-padded prompts with log-probs computed from the returned logits; then scoring: (c)
``HFGenerator.score_batch`` against (d) one unbatched forward per (prompt, continuation).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", default="alignflow-runs/bench/toy-world")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

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
        return ours.generate(messages, n=args.k, sampling=SamplingParams(max_new_tokens=args.max_new_tokens, seed=seed))

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
            alive = torch.ones_like(new, dtype=torch.bool)
            alive[:, 1:] = (new[:, :-1] != tok.eos_token_id).cumprod(-1).bool()
            logp = (token_logps * alive).sum(-1)
        return tok.batch_decode(new, skip_special_tokens=True), logp

    def timed(fn, *a):
        best = float("inf")
        for r in range(args.repeats):
            start = time.perf_counter()
            fn(*a, r) if a else fn(r)
            best = min(best, time.perf_counter() - start)
        return best

    run_ours(0), run_baseline(0)  # warm-up
    t_ours = timed(run_ours)
    t_base = timed(run_baseline)
    print(f"generate {n_samples} samples (<= {args.max_new_tokens} tokens, {args.threads} thread(s)), best of {args.repeats}:")
    print(f"  hf backend       {t_ours:7.3f} s  {n_samples / t_ours:8.1f} samples/s")
    print(f"  model.generate   {t_base:7.3f} s  {n_samples / t_base:8.1f} samples/s")
    print(f"  ratio ours/baseline time: {t_ours / t_base:.2f}")

    gens = run_ours(0)
    pairs_p = [m for m, g in zip(messages, gens) for _ in g]
    pairs_c = [x.text for g in gens for x in g]

    def run_score(_):
        return ours.score_batch(pairs_p, pairs_c)

    def run_naive(_):
        scores = []
        with torch.inference_mode():
            for m, c in zip(pairs_p, pairs_c):
                p_ids = ours.prompt_ids(m)
                c_ids = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + c_ids])
                lp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                scores.append(float(lp[len(p_ids) - 1:].gather(-1, ids[0, len(p_ids):, None]).sum()))
        return scores

    a, b = run_score(0), run_naive(0)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    t_score = timed(run_score)
    t_naive = timed(run_naive)
    print(f"score {len(pairs_c)} (prompt, continuation) pairs:")
    print(f"  score_batch      {t_score:7.3f} s")
    print(f"  one-by-one       {t_naive:7.3f} s")
    print(f"  ratio batched/one-by-one time: {t_score / t_naive:.2f}")


if __name__ == "__main__":
    main()
