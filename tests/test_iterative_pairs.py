"""Iterative pairs remember whether each sample ended by itself: a sample cut off at
max_new_tokens is trained without eos (training it with eos would teach the policy to stop
where it was merely truncated)."""

from __future__ import annotations

import torch

from alignflow.trainers.online.iterative import IterativeConfig, Pair, _finished, build_pairs


def _reward(prompts, responses):
    return [float(len(r)) for r in responses]  # longer is better


def test_build_pairs_carries_finished_flags():
    cfg = IterativeConfig(method="iterative-dpo", k=3)
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    samples = [["xx", "xxxx", "x"], ["yyy", "y", "yy"]]
    finished = [[True, False, True], [False, True, True]]
    pairs = build_pairs(cfg, prompts, samples, _reward, finished=finished)
    assert [(p.chosen, p.rejected, p.chosen_finished, p.rejected_finished) for p in pairs] == [
        ("xxxx", "x", False, True), ("yyy", "y", False, True)]
    # default: every sample finished
    assert all(p.chosen_finished and p.rejected_finished for p in build_pairs(cfg, prompts, samples, _reward))


def test_dno_gold_counts_as_finished():
    cfg = IterativeConfig(method="dno", k=2, dno_margin=0.0)
    prompt = [{"role": "user", "content": "q"}]

    def prefer_longer(ps, a, b):
        return [1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5 for x, y in zip(a, b)]

    pairs = build_pairs(cfg, [prompt], [["ab", "a"]], preference_fn=prefer_longer, gold={"q": "gold answer"},
                        finished=[[False, False]])
    (pair,) = pairs
    assert pair.chosen == "gold answer" and pair.chosen_finished and not pair.rejected_finished


def test_unfinished_response_is_scored_without_eos():
    from alignflow.trainers.logprobs import response_logps
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    tok = make_char_tokenizer()
    model = make_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    pairs = [Pair([{"role": "user", "content": "Spell out: 3"}], "three", "thr", rejected_finished=False)]
    with torch.no_grad():
        _, tokens = response_logps(model, tok, [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs],
                                   _finished(pairs))
        _, all_eos = response_logps(model, tok, [p.prompt for p in pairs], [[p.chosen, p.rejected] for p in pairs])
    assert tokens.tolist() == [[all_eos[0, 0].item(), all_eos[0, 1].item() - 1]]


def test_temperature_enhancer_pairs_main_against_enhancer():
    """Survey 3.1.3: the main policy answers, the enhancer (the main policy, hotter) answers the
    same prompt, the oracle labels that pair. _sample_round lays out K/2 main then K/2 enhancer
    samples; build_pairs pairs main j with enhancer j, whichever the reward prefers chosen."""
    from alignflow.schemas.generator import Generation, SamplingParams
    from alignflow.trainers.online.iterative import _sample_round
    from alignflow.trainers.online.rollout import Spend

    seen = []

    class Recorder:
        def generate(self, prompts, n=1, sampling=None):
            seen.append((n, sampling.temperature))
            tag = "m" if sampling.temperature == 1.0 else "h"
            return [[Generation(f"{tag}{j}" * (j + 1), 2) for j in range(n)] for _ in prompts]

    cfg = IterativeConfig(method="iterative-dpo", k=4, enhancer="temperature", enhancer_temperature=1.7,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=8))
    prompt = [{"role": "user", "content": "q"}]
    samples, finished = _sample_round(cfg, Recorder(), [prompt], Spend())
    assert seen == [(2, 1.0), (2, 1.7)] and samples == [["m0", "m1m1", "h0", "h1h1"]] and finished == [[True] * 4]

    # the reward prefers longer answers, except that m1m1 beats everything: best-vs-worst over the
    # union would give (m1m1, m0) or (m1m1, h0); main vs enhancer gives (h0 vs m0) and (m1m1 vs h1h1)
    def reward(prompts, responses):
        return [10.0 if r == "m1m1" else float(len(r)) + (0.5 if r.startswith("h") else 0.0) for r in responses]

    pairs = build_pairs(cfg, [prompt], samples, reward)
    assert [(p.chosen, p.rejected) for p in pairs] == [("h0", "m0"), ("m1m1", "h1h1")]
    # a tie between a main and an enhancer answer forms no pair
    tie = build_pairs(cfg, [prompt], [["aa", "b", "cc", "d"]], lambda p, r: [float(len(x)) for x in r])
    assert tie == []
    # with the rejection enhancer the same samples give best vs worst of all K
    rejection = IterativeConfig(method="iterative-dpo", k=4)
    assert [(p.chosen, p.rejected) for p in build_pairs(rejection, [prompt], samples, reward)] == [("m1m1", "m0")]
