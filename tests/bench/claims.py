"""The survey's comparative claims, measured on the toy world with several seeds.

    python tests/bench/claims.py [--out tests/bench/claims.md] [--seeds 8] [--workers 2] [--world DIR]

Each claim runs once per seed (a seed draws the training prompts, the samples, the data order and
the held-out sampling), in ``--workers`` processes of one torch thread each. ``claims.md`` gets
one row per claim: the survey section, what was measured (mean over seeds and a 95% t-interval
over the seeds), and whether the claim holds on the toy by the criterion stated in the row. A
claim that does not hold is reported with its numbers: nothing here was tuned until it held.
``claims.json`` beside it keeps every seed's numbers. The run prints its wall and CPU time.

Common ground: the toy world's SFT policy (tests/conftest.py's world, seed 0); held-out reward =
the mean task reward of 2 samples on each of 64 held-out prompts at temperature 1, the same
prompts and sampling seed before and after training (paired); offline training is the project's
``PreferenceTrainer`` (constant learning rate 2e-4, batch 16, the registry's default loss
parameters), online training the project's ``train_iterative``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's packages (and tests/intransitive.py)

EVAL_PROMPTS, EVAL_SAMPLES, MAX_NEW = 64, 2, 40
_WORLD: dict = {}


# --------------------------------------------------------------------------------------------
# The toy world and what every claim shares
# --------------------------------------------------------------------------------------------
def _init_worker(world_dir: str) -> None:
    import torch

    torch.set_num_threads(1)  # a 0.5 M-parameter model: one thread per process is the fastest use of 2 cores
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import logging

    logging.getLogger("alignflow").setLevel(logging.ERROR)  # "computing reference log-probs once" per run
    _WORLD["dir"] = world_dir


def world():
    """(toy world, tokenizer) of this process (built once by ``main``, loaded here)."""
    if "world" not in _WORLD:
        from transformers import AutoTokenizer

        from alignflow.flows.toy_world import build_toy_world

        w = build_toy_world(_WORLD["dir"], seed=0)
        _WORLD["world"], _WORLD["tok"] = w, AutoTokenizer.from_pretrained(w.path)
    return _WORLD["world"], _WORLD["tok"]


def sft():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world()[0].path)


def messages(prompts):
    return [[{"role": "user", "content": p}] for p in prompts]


def sample(model, prompts, n: int, seed: int, max_new: int = MAX_NEW) -> list[list[str]]:
    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.schemas.generator import SamplingParams

    gen = HFGenerator(model, world()[1], device="cpu", batch_size=256)
    out = gen.generate(messages(prompts), n=n, sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new,
                                                                       seed=seed))
    return [[g.text for g in gs] for gs in out]


def held_out(model, seed: int, task=None) -> dict[str, np.ndarray]:
    """Per held-out prompt: mean reward (of ``task``, default the world's), length-free quality,
    length in characters over ``EVAL_SAMPLES`` samples (fixed prompts and sampling seed)."""
    w, _ = world()
    task = task or w.task
    prompts = w.task.prompts(EVAL_PROMPTS, seed=990 + seed)
    resp = sample(model.eval(), prompts, EVAL_SAMPLES, seed=4242 + seed)
    flat_p = [p for p, rs in zip(prompts, resp) for _ in rs]
    flat_r = [r for rs in resp for r in rs]
    shape = (len(prompts), EVAL_SAMPLES)
    return {"reward": task.rewards(flat_p, flat_r).reshape(shape).mean(1),
            "quality": task.qualities(flat_p, flat_r).reshape(shape).mean(1),
            "length": np.array([len(r.strip()) for r in flat_r], dtype=float).reshape(shape).mean(1)}


def scored_samples(n_prompts: int, k: int, seed: int, task=None):
    """``k`` samples of the SFT policy on ``n_prompts`` training prompts, with their rewards."""
    w, _ = world()
    task = task or w.task
    prompts = w.task.prompts(n_prompts, seed=100 + seed)
    responses = sample(sft(), prompts, k, seed=seed)
    rewards = [task.rewards([p] * k, r).tolist() for p, r in zip(prompts, responses)]
    return prompts, responses, rewards


def train_offline(table, kind: str, loss: str, seed: int, epochs: float = 3, lr: float = 2e-4, batch: int = 16,
                  params: dict | None = None, callbacks: list | None = None):
    """A fresh copy of the SFT policy trained with the project's PreferenceTrainer."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.preference import PreferenceTrainer

    model = sft()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="claims-"), per_device_train_batch_size=batch,
                             num_train_epochs=epochs, learning_rate=lr, lr_scheduler_type="constant", report_to=[],
                             save_strategy="no", logging_steps=10_000, use_cpu=True, disable_tqdm=True,
                             dataloader_pin_memory=False, seed=seed, data_seed=seed)
    trainer = PreferenceTrainer(model, args, pretokenize(table, kind, world()[1]), kind=kind, loss=loss,
                                loss_params=params or {}, processing_class=world()[1], callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the run's metrics are not this table's
    try:
        trainer.train()
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy "no")
    return model.eval()


def pair_logps(model, pairs) -> np.ndarray:
    """Summed log-probs ``[N, 2]`` of (chosen, rejected) for (prompt, chosen, rejected) triples."""
    import torch

    from alignflow.trainers.logprobs import response_logps

    with torch.no_grad():
        out = [response_logps(model.eval(), world()[1], messages([p for p, _, _ in pairs[s:s + 64]]),
                              [[c, r] for _, c, r in pairs[s:s + 64]])[0] for s in range(0, len(pairs), 64)]
    return torch.cat(out).double().numpy()


def pairs_table(pairs):
    import pyarrow as pa

    return pa.table({"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
                     "rejected": [r for _, _, r in pairs], "margin": [1.0] * len(pairs),
                     "source": ["rule"] * len(pairs)})


def best_worst(prompts, responses, rewards):
    out = []
    for p, rs, sc in zip(prompts, responses, rewards):
        hi, lo = int(np.argmax(sc)), int(np.argmin(sc))
        if sc[hi] > sc[lo] and rs[hi] != rs[lo]:
            out.append((p, rs[hi], rs[lo]))
    return out


# --------------------------------------------------------------------------------------------
# One function per claim: (seed) -> numbers of that seed
# --------------------------------------------------------------------------------------------
def dpo_over_sft(seed: int) -> dict:
    """3.1.3: offline DPO on best-vs-worst pairs of 4 SFT samples (64 prompts, 3 epochs)."""
    before = held_out(sft(), seed)
    pairs = best_worst(*scored_samples(64, 4, seed))
    after = held_out(train_offline(pairs_table(pairs), "pairwise", "dpo", seed), seed)
    return {"sft": before["reward"].mean(), "dpo": after["reward"].mean(),
            "gain": (after["reward"] - before["reward"]).mean(), "pairs": len(pairs)}


def iterative_over_offline(seed: int) -> dict:
    """3.1.3 / 3.5: equal labels (384 judged samples, 4 per prompt), equal optimizer steps: one
    offline round on 96 prompts sampled from the SFT policy, against 3 rounds of 32 prompts each
    sampled from the current policy (reference refreshed every round). Same trainer otherwise."""
    from alignflow.flows.online import policy_generator_factory, toy_reward
    from alignflow.schemas.generator import SamplingParams
    from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

    w, tok = world()
    prompts = messages(w.task.prompts(96, seed=100 + seed))
    reward = toy_reward(w.task)
    out = {"sft": held_out(sft(), seed)["reward"].mean()}
    for name, rounds, per_round in (("offline", 1, 96), ("iterative", 3, 32)):
        cfg = IterativeConfig(method="iterative-dpo", rounds=rounds, prompts_per_round=per_round, k=4, epochs=2,
                              batch_size=16, lr=3e-4, terminate=False, seed=seed,
                              sampling=SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW))
        policy, report = train_iterative(sft(), tok, prompts, policy_generator_factory("cpu"), cfg, reward_fn=reward,
                                         eval_prompts=messages(w.task.prompts(8, seed=5)))
        out[name] = held_out(policy, seed)["reward"].mean()
        out[f"{name}_labels"] = report.judge_calls
    out["difference"] = out["iterative"] - out["offline"]
    return out


def ipo_vs_dpo_overfitting(seed: int, n_prompts: int = 64, epochs: int = 30, rewards: bool = True) -> dict:
    """3.3.6: 64 fixed pairs whose preference is deterministic (the same winner every time), 30
    epochs. Implicit reward margin D = (log pi - log pi_ref)(y_w) - (...)(y_l), mean over the
    training pairs; rejected log-prob change; held-out reward after 3 and 30 epochs (``rewards``).
    Keys name epoch 30 whatever ``epochs`` is (the suite's short version runs fewer)."""
    from transformers import TrainerCallback

    pairs = best_worst(*scored_samples(n_prompts, 4, seed))
    ref = pair_logps(sft(), pairs)
    out: dict[str, Any] = {"sft": held_out(sft(), seed)["reward"].mean()} if rewards else {}
    for loss in ("dpo", "ipo"):
        trace: dict[str, list] = {"margin": [], "rejected": [], "reward_at": {}}

        class Track(TrainerCallback):
            def on_epoch_end(self, args, state, control, model=None, **kw):
                lp = pair_logps(model, pairs) - ref
                trace["margin"].append(float((lp[:, 0] - lp[:, 1]).mean()))
                trace["rejected"].append(float(lp[:, 1].mean()))
                epoch = int(round(state.epoch))
                if rewards and epoch in (3, epochs):
                    trace["reward_at"][3 if epoch == 3 else 30] = float(held_out(model, seed)["reward"].mean())
                model.train()

        train_offline(pairs_table(pairs), "pairwise", loss, seed, epochs=epochs, callbacks=[Track()])
        out[f"{loss}_margin_3"], out[f"{loss}_margin_30"] = trace["margin"][2], trace["margin"][-1]
        out[f"{loss}_rejected_30"] = trace["rejected"][-1]
        if rewards:
            out[f"{loss}_reward_3"], out[f"{loss}_reward_30"] = trace["reward_at"][3], trace["reward_at"][30]
        out[f"{loss}_margins"] = trace["margin"]
    return out


def length_control(seed: int) -> dict:
    """3.8: pairs labelled by a length-biased judge (the task's reward with length_weight 0.5:
    longer answers win even when wrong); DPO, R-DPO, SimPO trained on the same pairs (3 epochs,
    registry defaults). Held-out response length (characters) and length-free quality."""
    from alignflow.feedback.toy_task import ToyTask

    biased = ToyTask(length_weight=0.5)
    base = held_out(sft(), seed)
    pairs = best_worst(*scored_samples(64, 4, seed, task=biased))
    out = {"sft_length": base["length"].mean(), "sft_quality": base["quality"].mean(),
           "chosen_longer": float(np.mean([len(c.strip()) > len(r.strip()) for _, c, r in pairs]))}
    for loss in ("dpo", "rdpo", "simpo"):
        after = held_out(train_offline(pairs_table(pairs), "pairwise", loss, seed), seed)
        out[f"{loss}_growth"] = (after["length"] - base["length"]).mean()
        out[f"{loss}_quality"] = after["quality"].mean()
    return out


def kto_vs_dpo(seed: int) -> dict:
    """3.6.1: the same responses (best and worst of 4 SFT samples per prompt, 64 prompts): DPO on
    them as pairs, KTO on them as unpaired desirable / undesirable labels; 3 epochs each, the
    same sequences per step (16 pairs vs 32 single responses)."""
    import pyarrow as pa

    before = held_out(sft(), seed)
    pairs = best_worst(*scored_samples(64, 4, seed))
    binary = pa.table({"prompt": [p for p, _, _ in pairs] * 2,
                       "response": [c for _, c, _ in pairs] + [r for _, _, r in pairs],
                       "label": [True] * len(pairs) + [False] * len(pairs)})
    dpo = held_out(train_offline(pairs_table(pairs), "pairwise", "dpo", seed), seed)
    kto = held_out(train_offline(binary, "binary", "kto", seed, batch=32), seed)
    return {"dpo_gain": (dpo["reward"] - before["reward"]).mean(),
            "kto_gain": (kto["reward"] - before["reward"]).mean(),
            "kto_minus_dpo": (kto["reward"] - dpo["reward"]).mean()}


def dpop_vs_dpo(seed: int, n_prompts: int = 64, epochs: int = 10) -> dict:
    """3.3.4: pairs of small edit distance (the correct answer against itself with one character
    replaced, 64 prompts), 10 epochs; the chosen answers' log-prob change against the reference,
    mean over the training pairs (and the rejected ones')."""
    import random

    w, _ = world()
    rng = random.Random(f"dpop-{seed}")
    pairs = []
    for p in w.task.prompts(n_prompts, seed=300 + seed):
        ans = w.task.reference(p)
        i = rng.randrange(len(ans))
        pairs.append((p, ans, ans[:i] + rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != ans[i]])
                      + ans[i + 1:]))
    ref = pair_logps(sft(), pairs)
    out = {}
    for loss in ("dpo", "dpop"):
        lp = pair_logps(train_offline(pairs_table(pairs), "pairwise", loss, seed, epochs=epochs), pairs) - ref
        out[f"{loss}_chosen"], out[f"{loss}_rejected"] = float(lp[:, 0].mean()), float(lp[:, 1].mean())
    return out


def nash_vs_bt(seed: int) -> dict:
    """3.13: the three-style cyclic game of tests/intransitive.py (start 0.6 / 0.3 / 0.1,
    exploitability 0.25); 40 rounds (SPPO, DNO without gold, BT-DPO) or 160 steps (Nash-MD).
    Exploitability of the average policy over the iterates and of the last iterate."""
    from alignflow.flows.online import policy_generator_factory
    from tests import intransitive as game

    policy, tok, train = game.build_policy(seed=seed)
    bt = game.fit_bt_rewards(policy, tok, policy_generator_factory("cpu"), seed=seed)
    out = {"start": game.exploitability(game.style_probs(policy, tok))}
    for method in game.GAME_METHODS:
        iterates = game.run_method(method, policy, tok, train, bt, seed=seed)
        out[f"{method}_average"] = game.exploitability(game.average_policy(iterates))
        out[f"{method}_last"] = game.exploitability(iterates[-1])
    return out


class BiasedJudgeScorer:
    """A judge model with position bias, as a ``Scorer`` for the project's ``PairwiseJudge``: the
    log-odds that the FIRST shown answer is better are ``(r_first - r_second) / 0.1 + 1.0 + noise``
    (noise N(0, 1) per reading; r the task reward it perceives). At equal answers it says "the
    first" 73% of the time."""

    def __init__(self, task, rng, bias: float = 1.0, scale: float = 0.1, noise: float = 1.0):
        self.task, self.rng, self.bias, self.scale, self.noise = task, rng, bias, scale, noise

    def score_batch(self, prompts, continuations):
        import re

        from alignflow.feedback.judges.templates import unquote

        out = []
        for msgs in prompts:
            text = msgs[-1]["content"]
            # the last tagged sample is the pair to judge (few-shot exemplars come before it)
            request, first, second = (unquote(re.findall(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.S)[-1])
                                      for tag in ("request", "response_1", "response_2"))
            r1, r2 = self.task.rewards([request, request], [first, second])
            logit = (r1 - r2) / self.scale + self.bias + self.rng.normal(0.0, self.noise)
            out.append([-math.log1p(math.exp(-logit)), -math.log1p(math.exp(logit))])  # log p("1"), log p("2")
        return out


def debiased_judging(seed: int, n_prompts: int = 150) -> dict:
    """3.2.2: 300 pairs of different-reward SFT samples, shown in random order; the position-biased
    judge through ``PairwiseJudge`` (both orders, averaged) against its first reading alone;
    agreement = share of pairs where the judge prefers the answer the verifier (task reward)
    prefers (P = 1/2 counts half)."""
    from alignflow.feedback.judges import PairwiseJudge

    w, _ = world()
    rng = np.random.default_rng(seed)
    prompts, responses, rewards = scored_samples(n_prompts, 4, seed)
    a, b, truth, ps = [], [], [], []
    for p, rs, sc in zip(prompts, responses, rewards):
        for i, j in ((0, 1), (2, 3)):
            if sc[i] != sc[j]:
                ps.append(p)
                a.append(rs[i])
                b.append(rs[j])
                truth.append(sc[i] > sc[j])
    judge = PairwiseJudge(generator=None, scorer=BiasedJudgeScorer(w.task, rng), mode="logprobs")
    result = judge.judge(ps, a, b)
    truth = np.array(truth)

    def agreement(p):
        return float(np.mean(np.where(p == 0.5, 0.5, (p > 0.5) == truth)))

    return {"pairs": len(truth), "one_order": agreement(result.p_ab), "both_orders": agreement(result.judge_prob),
            "first_shown_wins": float(np.mean(result.p_ab > 0.5))}


# --------------------------------------------------------------------------------------------
# Claims: statement, section, runner, and how the seeds' numbers become a verdict
# --------------------------------------------------------------------------------------------
def ci(values) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - h, m + h


def fmt(values, digits: int = 3) -> str:
    m, lo, hi = ci(values)
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


@dataclass
class Claim:
    key: str
    section: str
    statement: str
    run: Callable[[int], dict]
    judge: Callable[[list[dict]], tuple[str, bool, str]]  # seeds' numbers -> (measured, holds, criterion)
    seeds: int | None = None  # None: --seeds


def col(rows, key):
    return [r[key] for r in rows]


def judge_dpo(rows):
    m = (f"held-out reward SFT {fmt(col(rows, 'sft'))} -> DPO {fmt(col(rows, 'dpo'))}; "
         f"gain {fmt(col(rows, 'gain'))} ({int(np.mean(col(rows, 'pairs')))} pairs)")
    return m, ci(col(rows, "gain"))[1] > 0, "gain's 95% interval above 0"


def judge_iterative(rows):
    m = (f"held-out reward SFT {fmt(col(rows, 'sft'))}, one offline round {fmt(col(rows, 'offline'))}, "
         f"3 iterative rounds {fmt(col(rows, 'iterative'))}; iterative - offline {fmt(col(rows, 'difference'))} "
         f"(labels {rows[0]['offline_labels']} vs {rows[0]['iterative_labels']})")
    return m, ci(col(rows, "difference"))[1] > 0, "difference's 95% interval above 0"


def judge_ipo_margin(rows):
    def both(key):
        return f"{fmt(col(rows, key + '_3'), 1)} / {fmt(col(rows, key + '_30'), 1)}"

    m = (f"margin D after 3 / 30 epochs: DPO {both('dpo_margin')}, IPO {both('ipo_margin')} (IPO's target "
         f"1/(2 beta) = 5); rejected log-prob change at 30: DPO {fmt(col(rows, 'dpo_rejected_30'), 1)}, "
         f"IPO {fmt(col(rows, 'ipo_rejected_30'), 1)}")
    ok = (ci(np.subtract(col(rows, "dpo_margin_30"), col(rows, "ipo_margin_30")))[1] > 0
          and ci(np.subtract(col(rows, "ipo_rejected_30"), col(rows, "dpo_rejected_30")))[1] > 0
          and ci(np.abs(np.subtract(col(rows, "ipo_margin_30"), 5.0)))[0] < 2.5)
    return m, ok, ("DPO's margin above IPO's and its rejected log-prob lower (intervals of the differences), "
                   "IPO's margin within 2.5 of 5")


def judge_ipo_reward(rows):
    m = (f"held-out reward SFT {fmt(col(rows, 'sft'))}; after 3 / 30 epochs: DPO {fmt(col(rows, 'dpo_reward_3'))} / "
         f"{fmt(col(rows, 'dpo_reward_30'))}, IPO {fmt(col(rows, 'ipo_reward_3'))} / {fmt(col(rows, 'ipo_reward_30'))}")
    diff = np.subtract(col(rows, "ipo_reward_30"), col(rows, "dpo_reward_30"))
    return m + f"; IPO - DPO at 30: {fmt(diff)}", ci(diff)[1] > 0, "IPO - DPO at 30 epochs: interval above 0"


def judge_length(rows):
    m = (f"chosen longer in {fmt(col(rows, 'chosen_longer'), 2)} of pairs; length growth (chars) DPO "
         f"{fmt(col(rows, 'dpo_growth'), 2)}, R-DPO {fmt(col(rows, 'rdpo_growth'), 2)}, SimPO "
         f"{fmt(col(rows, 'simpo_growth'), 2)}; quality SFT {fmt(col(rows, 'sft_quality'))}, DPO "
         f"{fmt(col(rows, 'dpo_quality'))}, R-DPO {fmt(col(rows, 'rdpo_quality'))}, "
         f"SimPO {fmt(col(rows, 'simpo_quality'))}")
    each = {n: ci(np.subtract(col(rows, "dpo_growth"), col(rows, f"{k}_growth")))[1] > 0
            for n, k in (("R-DPO", "rdpo"), ("SimPO", "simpo"))}
    verdicts = ", ".join(f"{n} {'holds' if ok else 'does not hold'}" for n, ok in each.items())
    return m + "; " + verdicts, all(each.values()), "DPO growth - method growth: interval above 0, for each method"


def judge_kto(rows):
    m = (f"gain DPO {fmt(col(rows, 'dpo_gain'))}, KTO {fmt(col(rows, 'kto_gain'))}; "
         f"KTO - DPO {fmt(col(rows, 'kto_minus_dpo'))}")
    _, lo, hi = ci(col(rows, "kto_minus_dpo"))
    return m, ci(col(rows, "kto_gain"))[1] > 0 and hi > 0, ("KTO's gain above 0 and KTO - DPO not below 0 "
                                                             "(its interval reaches 0)")


def judge_dpop(rows):
    m = (f"chosen log-prob change: DPO {fmt(col(rows, 'dpo_chosen'), 2)}, DPOP {fmt(col(rows, 'dpop_chosen'), 2)}; "
         f"rejected: DPO {fmt(col(rows, 'dpo_rejected'), 2)}, DPOP {fmt(col(rows, 'dpop_rejected'), 2)} (nats)")
    ok = ci(col(rows, "dpo_chosen"))[2] < 0 and ci(col(rows, "dpop_chosen"))[1] > ci(col(rows, "dpo_chosen"))[2]
    return m, ok, "DPO's chosen change below 0 and DPOP's above DPO's (disjoint intervals)"


def judge_nash(rows, which: str):
    m = f"exploitability ({which}), start {fmt(col(rows, 'start'))}: " + ", ".join(
        f"{name} {fmt(col(rows, f'{name}_{which}'))}" for name in ("nash-md", "sppo", "dno", "bt-dpo"))
    each = {n: (ci(np.subtract(col(rows, "start"), col(rows, f"{n}_{which}")))[1] > 0
                and ci(np.subtract(col(rows, f"bt-dpo_{which}"), col(rows, f"{n}_{which}")))[1] > 0)
            for n in ("nash-md", "sppo", "dno")}
    verdicts = ", ".join(f"{n} {'holds' if ok else 'does not hold'}" for n, ok in each.items())
    return (m + "; " + verdicts, all(each.values()),
            "for each Nash method: start - method and BT-DPO - method, both intervals above 0 (nearer the "
            "equilibrium than the start and than BT-DPO)")


def judge_judging(rows):
    m = (f"agreement with the verifier: one order {fmt(col(rows, 'one_order'))}, both orders "
         f"{fmt(col(rows, 'both_orders'))} ({rows[0]['pairs']} pairs; first shown preferred "
         f"{fmt(col(rows, 'first_shown_wins'), 2)} in one order)")
    diff = np.subtract(col(rows, "both_orders"), col(rows, "one_order"))
    return m + f"; difference {fmt(diff)}", ci(diff)[1] > 0, "both - one order: interval above 0"


CLAIMS = [
    Claim("dpo_over_sft", "3.1.3", "DPO on preference pairs improves on the SFT policy", dpo_over_sft, judge_dpo),
    Claim("iterative_over_offline", "3.1.3, 3.5", "iterative DPO beats one offline round at equal labels",
          iterative_over_offline, judge_iterative),
    Claim("ipo_margin", "3.3.6", "on deterministic preferences DPO drives the rejected likelihood down without "
          "bound, IPO keeps its margin at 1/(2 beta)", ipo_vs_dpo_overfitting, judge_ipo_margin),
    Claim("ipo_reward", "3.3.6", "... and IPO therefore overfits less: higher held-out reward after many epochs",
          ipo_vs_dpo_overfitting, judge_ipo_reward),
    Claim("length", "3.8", "R-DPO and SimPO grow the length less than DPO under a length-biased judge",
          length_control, judge_length),
    Claim("kto", "3.6.1", "KTO from unpaired binary labels reaches DPO's gain on the same responses",
          kto_vs_dpo, judge_kto),
    Claim("dpop", "3.3.4", "DPOP keeps the chosen log-prob from falling where DPO lowers it (small edit distance)",
          dpop_vs_dpo, judge_dpop),
    Claim("nash_average", "3.13", "Nash methods beat BT-based DPO on intransitive preferences (average policy)",
          nash_vs_bt, lambda rows: judge_nash(rows, "average")),
    Claim("nash_last", "3.13", "... measured on the last iterate", nash_vs_bt,
          lambda rows: judge_nash(rows, "last")),
    Claim("judging", "3.2.2", "position-debiased judging (both orders) agrees with the verifier more often than one "
          "order, for a judge with position bias", debiased_judging, judge_judging),
]


def _job(args: tuple[str, int]) -> tuple[str, int, dict, float]:
    name, seed = args
    t0 = time.process_time()
    result = RUNNERS[name](seed)
    return name, seed, result, time.process_time() - t0


RUNNERS = {c.run.__name__: c.run for c in CLAIMS}


def write_markdown(path: Path, results: dict, seeds: int, wall: float, cpu: float) -> str:
    lines = ["# The survey's claims on the toy world", "",
             f"`python tests/bench/claims.py`: {seeds} seeds (0-{seeds - 1}). Numbers: mean over seeds [95% t-interval over "
             "seeds]. Each claim's criterion is in its row; a claim that does not hold is reported as measured, "
             "untuned.", "",
             f"Run: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (2 worker processes of one torch thread on a "
             f"2-core machine shared with other jobs; `claims.json` beside this file has every seed's numbers).", "",
             "| claim | survey | measured | holds? | criterion |", "| --- | --- | --- | --- | --- |"]
    for claim in CLAIMS:
        rows = [results[claim.run.__name__][s] for s in sorted(results[claim.run.__name__])]
        measured, holds, criterion = claim.judge(rows)
        lines.append(f"| {claim.statement} | {claim.section} | {measured} | {'holds' if holds else 'does not hold'} "
                     f"| {criterion} |")
    text = "\n".join(lines) + "\n\n" + NOTES
    path.write_text(text)
    return text


NOTES = """## Set-ups

- World: the toy world (char-level tiny Llama fitted to "spell out a number" answers of mixed
  quality; reward = share of correct characters). Held-out: 64 prompts x 2 samples, paired.
- Offline training: `PreferenceTrainer`, lr 2e-4 constant, batch 16, registry defaults (DPO and
  IPO beta 0.1, R-DPO alpha 0.01, SimPO beta 2 / gamma 0.5, KTO beta 0.1, DPOP lambda 50).
- Iterative vs offline: `train_iterative` for both (lr 3e-4, 2 epochs per round, batch 16), 384
  judged samples each: 1 round of 96 prompts from the SFT policy vs 3 rounds of 32 from the
  current policy; both take 12 optimizer steps.
- Length: the task's reward with `length_weight` 0.5 labels the pairs (a longer answer earns up to
  half the reward even when wrong); lengths are of held-out samples, quality is length-free.
- DPOP: pairs are the correct answer against itself with one character replaced (edit distance
  1), 10 epochs.
- Nash: tests/intransitive.py (three styles, B > A, C > B, A > C; equilibrium = uniform). SPPO,
  DNO, BT-DPO: 40 rounds of 16 prompts x 4 samples; Nash-MD 160 steps. The average policy is the
  uniform mixture of the iterates; last = the final iterate.
- Judging: a simulated judge model with position bias (log-odds first-better = reward gap / 0.1 +
  1.0 + N(0, 1) per reading) through the project's `PairwiseJudge`; pairs of SFT samples whose
  task rewards differ, in random order.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("claims.md"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--world", type=Path, default=Path(tempfile.gettempdir()) / "alignflow-claims-world")
    ap.add_argument("--only", default="", help="comma-separated runner names (debugging)")
    ap.add_argument("--from-json", type=Path, help="rewrite the table from a run's claims.json, running nothing")
    opts = ap.parse_args()
    if opts.from_json:
        saved = json.loads(opts.from_json.read_text())
        results = {k: {int(s): v for s, v in r.items()} for k, r in saved["results"].items()}
        seeds = len(next(iter(results.values())))
        print(write_markdown(opts.out, results, seeds, saved["wall_s"], saved["cpu_s"]))
        return

    start = time.perf_counter()
    _init_worker(str(opts.world))
    world()  # build (or find) the toy world once, before the workers start
    jobs, seen = [], set()
    for claim in CLAIMS:
        name = claim.run.__name__
        if name in seen or (opts.only and name not in opts.only.split(",")):
            continue
        seen.add(name)
        jobs += [(name, s) for s in range(claim.seeds or opts.seeds)]
    jobs.sort(key=lambda j: j[0] != "nash_vs_bt")  # the longest jobs first
    results: dict[str, dict[int, dict]] = {}
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(opts.workers, initializer=_init_worker, initargs=(str(opts.world),),
                                      maxtasksperchild=8) as pool:
        for name, seed, result, cpu_s in pool.imap_unordered(_job, jobs):
            results.setdefault(name, {})[seed] = result
            print(f"{name:<24} seed {seed}: {cpu_s:6.1f} s CPU  " + ", ".join(
                f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)), flush=True)
    wall = time.perf_counter() - start
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    opts.out.with_suffix(".json").write_text(json.dumps(
        {"wall_s": wall, "cpu_s": cpu, "results": {k: {str(s): v for s, v in r.items()} for k, r in results.items()}},
        indent=1, default=float))
    if opts.only:
        print(f"wall {wall:.0f} s, CPU {cpu:.0f} s")
        return
    print(write_markdown(opts.out, results, opts.seeds, wall, cpu))
    print(f"wrote {opts.out} in {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU")


if __name__ == "__main__":
    main()
