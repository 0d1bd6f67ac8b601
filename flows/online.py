"""Composition of online methods: builds the generator and the judge from ``feedback`` and hands
them to the trainers of ``trainers`` (which never import ``feedback``).

``run_online(config)`` runs one method end to end on a checkpoint (the toy world's or a real
one) and writes ``OUTPUT/model`` (the trained weights + tokenizer) and ``OUTPUT/report.json``
(reward before/after, KL to the reference, generations and judge calls spent, wall time,
per-round history and, for iterative methods, the termination rule's decision and evidence).
PPO, RLOO, DRO-V, Nash-MD, PAFT and the iterative methods checkpoint into ``OUTPUT/checkpoints`` (every
``checkpoint_every`` steps / every epoch / every finished round): running the same config into the same
output folder again resumes a killed run instead of starting over.

Rewards come from either source RLAIF (3.2.2) compares: ``reward="direct"`` uses the judge's
score as the reward; ``reward="distilled"`` first trains a BT reward model on the judge's
preferences over on-policy samples and uses that.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

from alignflow.schemas.generator import SamplingParams

METHODS = ("reward-model", "preference-model", "ppo", "rloo", "iterative-dpo", "self-rewarding", "cringe",
           "sppo", "nash-md", "dno", "paft", "token-rewards", "dro-v")


# --------------------------------------------------------------------------------------------
# Adapters: feedback objects -> the schemas.online protocols trainers receive
# --------------------------------------------------------------------------------------------
def policy_generator_factory(device: str | None = "cpu", batch_size: int = 64):
    """``PolicyGeneratorFactory``: the ``hf`` backend over the LIVE policy object."""
    from alignflow.feedback.generation.hf import HFGenerator

    def make(model: Any, tokenizer: Any):
        return HFGenerator(model, tokenizer, device=device, batch_size=batch_size)

    return make


class JudgeReward:
    """``RewardFn`` over a pointwise judge (``score(prompts, responses) -> array``)."""

    def __init__(self, judge: Any):
        self.judge = judge

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self.judge.score(list(prompts), list(responses))]


class JudgePreference:
    """``PreferenceFn`` over a pairwise judge (position-debiased: both orders averaged)."""

    def __init__(self, judge: Any):
        self.judge = judge

    def __call__(self, prompts, responses_a, responses_b) -> list[float]:
        return [float(x) for x in self.judge.judge(list(prompts), list(responses_a), list(responses_b)).judge_prob]


class RewardPreference:
    """``PreferenceFn`` from a pointwise reward through Bradley-Terry: ``sigmoid((r_a - r_b)/scale)``
    (symmetric by construction, so position-debiased)."""

    def __init__(self, reward_fn: Any, scale: float = 0.1):
        self.reward_fn, self.scale = reward_fn, scale

    def __call__(self, prompts, responses_a, responses_b) -> list[float]:
        ra = self.reward_fn(list(prompts), list(responses_a))
        rb = self.reward_fn(list(prompts), list(responses_b))
        return [1.0 / (1.0 + math.exp(-(a - b) / self.scale)) for a, b in zip(ra, rb)]


def self_rewarding_judge_factory(device: str | None = "cpu"):
    """``JudgeFactory`` for self-rewarding (3.5.1): the live model judges with the 5-point rubric."""
    from alignflow.feedback.judges import RubricJudge

    make_gen = policy_generator_factory(device)

    def make(model: Any, tokenizer: Any):
        return JudgeReward(RubricJudge(make_gen(model, tokenizer)))

    return make


def toy_reward(task: Any) -> JudgeReward:
    from alignflow.feedback.judges import FunctionJudge

    return JudgeReward(FunctionJudge.from_task(task))


# --------------------------------------------------------------------------------------------
# Config and the run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OnlineRunConfig:
    method: str
    model: str  # checkpoint folder of the starting policy (SFT)
    output: str
    judge: dict = dataclasses.field(default_factory=lambda: {"type": "verifier"})  # flows.tasks.make_judge spec
    reward: str = "direct"  # or "distilled" (train a BT reward model on the judge first)
    preference: str = "reward"  # nash methods: "reward" (BT of the judge's score), "judge" (pairwise judge), or a preference-model path
    task: dict = dataclasses.field(default_factory=dict)  # toy-task kwargs (prompts + verifier)
    prompts: int = 64
    eval_prompts: int = 32
    data: str | None = None  # pairwise/listwise dataset (reward-model, preference-model); binary/scored (dro-v)
    params: dict = dataclasses.field(default_factory=dict)  # method config overrides
    temperature: float = 1.0
    max_new_tokens: int = 24
    device: str = "cpu"
    seed: int = 0
    checkpoints: bool = True  # write OUTPUT/checkpoints and resume from them (all but token-rewards)


def _override(obj: Any, params: dict) -> Any:
    known = {f.name for f in dataclasses.fields(obj)}
    bad = sorted(set(params) - known)
    if bad:
        raise ValueError(f"unknown parameter(s) {', '.join(bad)} for {type(obj).__name__}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(obj, **params)


def _samples_to_examples(make_gen, policy, tokenizer, prompts, reward_fn, k: int, sampling) -> list:
    """On-policy listwise data: K samples per prompt scored by the judge (for RM / PM training)."""
    from alignflow.trainers.reward_model import RankedExample

    gens = make_gen(policy, tokenizer).generate(prompts, n=k, sampling=sampling)
    flat_p = [p for p, g in zip(prompts, gens) for _ in g]
    scores = reward_fn(flat_p, [x.text for g in gens for x in g])
    out, pos = [], 0
    for p, g in zip(prompts, gens):
        out.append(RankedExample(p, [x.text for x in g], [float(s) for s in scores[pos:pos + len(g)]]))
        pos += len(g)
    return out


def run_online(config: OnlineRunConfig | dict) -> dict:
    """Run one online method; returns the report dict (also written to OUTPUT/report.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.flows.tasks import make_judge, toy_task
    from alignflow.trainers import encoding

    cfg = config if isinstance(config, OnlineRunConfig) else OnlineRunConfig(**config)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    task = toy_task(cfg.task)
    prompts = [encoding.as_messages(p) for p in task.prompts(cfg.prompts, seed=cfg.seed)]
    eval_prompts = [encoding.as_messages(p) for p in task.prompts(cfg.eval_prompts, seed=cfg.seed + 1000)]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(cfg.device)  # trainers build on its device
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    make_gen = policy_generator_factory(cfg.device)
    judge_reward = JudgeReward(make_judge({**cfg.judge, "task": cfg.judge.get("task", cfg.task)}))
    report: dict

    if cfg.method in ("reward-model", "preference-model"):
        report = _train_judge_model(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, judge_reward, sampling, out)
    elif cfg.method == "token-rewards":
        report = _token_rewards_demo(cfg, policy, tokenizer, eval_prompts, judge_reward, out)
    else:
        reward_fn = judge_reward
        if cfg.reward == "distilled":
            reward_fn = _distilled_reward(cfg, policy, tokenizer, prompts, make_gen, judge_reward, sampling, out)
        elif cfg.reward != "direct":
            raise ValueError("reward must be 'direct' or 'distilled'")
        preference_fn = _preference(cfg, reward_fn, tokenizer)
        policy, rep = _train_policy(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, reward_fn,
                                    judge_reward, preference_fn, task, sampling)
        policy.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        report = rep.to_dict()
    report.update({"method": cfg.method, "config": dataclasses.asdict(cfg)})
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _preference(cfg: OnlineRunConfig, reward_fn: Any, tokenizer: Any):
    if cfg.method not in ("sppo", "nash-md", "dno"):
        return None
    if cfg.preference == "reward":
        return RewardPreference(reward_fn, scale=float(cfg.params.pop("preference_scale", 0.1)))
    if cfg.preference == "judge":
        from alignflow.flows.tasks import make_judge

        return JudgePreference(make_judge({**cfg.judge, "type": "pairwise_llm"}))
    from transformers import AutoModelForSequenceClassification

    from alignflow.trainers.preference_model import PreferenceModelFn

    model = AutoModelForSequenceClassification.from_pretrained(cfg.preference, num_labels=1).to(cfg.device)
    return PreferenceModelFn(model, tokenizer)


def _train_policy(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, reward_fn, eval_reward, preference_fn,
                  task, sampling):
    params = dict(cfg.params)
    ckpt = Path(cfg.output) / "checkpoints" if cfg.checkpoints else None
    if cfg.method == "dro-v":
        from alignflow.trainers.online.dro_v import DROVConfig, train_dro_v, trajectories_from_table

        trajectories = None
        if cfg.data:  # offline DRO: scored single responses (binary kind: reward or label column)
            from alignflow.schemas.store import read_dataset

            trajectories = trajectories_from_table(read_dataset(cfg.data))
        policy, _, rep = train_dro_v(policy, tokenizer, _override(DROVConfig(sampling=sampling, seed=cfg.seed), params),
                                     trajectories=trajectories, prompts=prompts, make_generator=make_gen,
                                     reward_fn=reward_fn, eval_prompts=eval_prompts, eval_reward_fn=eval_reward,
                                     checkpoint_dir=ckpt)
    elif cfg.method == "ppo":
        from alignflow.trainers.online.ppo import PPOConfig, train_ppo

        pcfg = _override(PPOConfig(sampling=sampling, seed=cfg.seed), params)
        ptx = None
        if pcfg.ptx_coef > 0:  # the toy world's "pretraining" text: prompts with their answers
            ptx = [f"{p} {task.reference(p)}" for p in task.prompts(256, seed=cfg.seed + 7)]
        policy, _, rep = train_ppo(policy, tokenizer, prompts, make_gen, reward_fn, pcfg, ptx_texts=ptx,
                                   eval_prompts=eval_prompts, eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    elif cfg.method == "rloo":
        from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

        policy, rep = train_rloo(policy, tokenizer, prompts, make_gen, reward_fn,
                                 _override(RLOOConfig(sampling=sampling, seed=cfg.seed), params), eval_prompts=eval_prompts,
                                 eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    elif cfg.method == "nash-md":
        from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

        policy, rep = train_nash_md(policy, tokenizer, prompts, make_gen, preference_fn,
                                    _override(NashMDConfig(sampling=sampling, seed=cfg.seed), params),
                                    eval_prompts=eval_prompts, eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    elif cfg.method == "paft":
        from alignflow.trainers.online.paft import PAFTConfig, train_paft

        policy, rep = train_paft(policy, tokenizer, prompts, make_gen, reward_fn,
                                 _override(PAFTConfig(sampling=sampling, seed=cfg.seed), params), eval_prompts=eval_prompts,
                                 eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    else:
        from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

        icfg = _override(IterativeConfig(method=cfg.method, sampling=sampling, seed=cfg.seed), params)
        judge_factory = self_rewarding_judge_factory(cfg.device) if cfg.method == "self-rewarding" else None
        gold = {ro_text(p): task.reference(ro_text(p)) for p in prompts} if cfg.method == "dno" else None
        policy, rep = train_iterative(policy, tokenizer, prompts, make_gen, icfg, reward_fn=reward_fn,
                                      preference_fn=preference_fn, judge_factory=judge_factory, gold=gold,
                                      eval_prompts=eval_prompts, eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    rep.extra["reward_source"] = cfg.reward
    return policy, rep


def ro_text(prompt: Any) -> str:
    from alignflow.trainers.encoding import prompt_text_of

    return prompt_text_of(prompt)


def _distilled_reward(cfg, policy, tokenizer, prompts, make_gen, judge_reward, sampling, out: Path):
    """RLAIF "distilled": a BT reward model trained on the judge's rankings of on-policy samples."""
    from alignflow.feedback.judges import RewardModelJudge
    from alignflow.trainers.reward_model import RewardModelConfig, make_reward_model, train_reward_model

    examples = _samples_to_examples(make_gen, policy, tokenizer, prompts, judge_reward, 4, sampling)
    rm = make_reward_model(cfg.model, tokenizer).to(cfg.device)
    metrics = train_reward_model(rm, tokenizer, examples, examples[-8:], RewardModelConfig(epochs=3, lr=3e-4))
    rm.save_pretrained(out / "reward-model")
    tokenizer.save_pretrained(out / "reward-model")
    (out / "reward-model" / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return JudgeReward(RewardModelJudge(rm, tokenizer, device=cfg.device))


def _train_judge_model(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, judge_reward, sampling, out: Path) -> dict:
    """reward-model / preference-model: on a dataset (``data``) or on judged on-policy samples."""
    from alignflow.trainers.reward_model import (
        RewardModelConfig,
        examples_from_table,
        make_reward_model,
        train_reward_model,
    )

    if cfg.data:
        from alignflow.schemas.store import read_dataset

        examples = examples_from_table(read_dataset(cfg.data))
        cut = max(1, len(examples) // 10)
        train, held = examples[cut:], examples[:cut]
    else:
        k = int(cfg.params.get("k", 4))
        train = _samples_to_examples(make_gen, policy, tokenizer, prompts, judge_reward, k, sampling)
        held = _samples_to_examples(make_gen, policy, tokenizer, eval_prompts, judge_reward, k, sampling)
    params = {k: v for k, v in cfg.params.items() if k != "k"}
    model = make_reward_model(cfg.model, tokenizer).to(cfg.device)
    if cfg.method == "reward-model":
        metrics = train_reward_model(model, tokenizer, train, held, _override(RewardModelConfig(seed=cfg.seed), params))
    else:
        from alignflow.trainers.preference_model import PreferenceModelConfig, train_preference_model

        metrics = train_preference_model(model, tokenizer, train, held, _override(PreferenceModelConfig(seed=cfg.seed), params))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {**metrics, "train_prompts": len(train), "heldout_prompts": len(held)}


def _token_rewards_demo(cfg, policy, tokenizer, eval_prompts, judge_reward, out: Path) -> dict:
    """Beam search with growing beams on held-out prompts: mean judge reward per beam size.
    ``params``: ``ref`` (reference checkpoint; default: the policy itself, i.e. plain likelihood),
    ``beams`` (list), ``beta``, ``objective``."""
    from transformers import AutoModelForCausalLM

    from alignflow.trainers.token_rewards import beam_search_batch

    ref_path = cfg.params.get("ref")
    ref = AutoModelForCausalLM.from_pretrained(ref_path) if ref_path else policy
    beams = cfg.params.get("beams", [1, 2, 4])
    table = {}
    for b in beams:
        texts = [x[0] for x in beam_search_batch(policy, ref, tokenizer, eval_prompts, beam_size=int(b),
                                                 beta=float(cfg.params.get("beta", 0.1)), max_new_tokens=cfg.max_new_tokens,
                                                 objective=cfg.params.get("objective", "q"))]
        table[str(b)] = sum(judge_reward(eval_prompts, texts)) / len(texts)
    return {"reward_by_beam": table}
