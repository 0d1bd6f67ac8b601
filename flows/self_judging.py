"""A toy world whose model is also its own rubric judge: the seed model of self-rewarding.

Self-rewarding (survey 3.5.1) needs a model that can read a rubric and score a response. The
toy world's char model cannot at first (its rubric scores are uncorrelated with the reward),
so this stage adds evaluation fine-tuning, as the method's seed model has:

    toy world (IFT) -> sample K responses -> verifier rewards ->
    EFT examples (rubric prompt -> score token) + IFT examples -> SFT -> self-judging model

The rubric is a compact one (``TOY_RUBRIC``) because the toy model's context is 256 characters;
the candidate is still quoted in tags exactly as ``RubricJudge`` renders it. The result is
cached like the toy world (a marker with the config hash) and reports how well the model's own
judgement agrees with the verifier before and after EFT (Spearman, on held-out samples).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alignflow.feedback.judges.templates import RubricTemplate
from alignflow.flows.toy_world import MARKER as WORLD_MARKER
from alignflow.flows.toy_world import ToyWorld, read_marker, write_marker

MARKER = "self_judging.json"
CHECKPOINT_DIR = "self-judging-model"
TOY_RUBRIC = RubricTemplate(preamble="Score the response 0-5.", ending="Score:")


@dataclass(frozen=True)
class SelfJudgingConfig:
    """Sizes of the EFT stage (its hash, with the base world's, names a finished build)."""

    eft_prompts: int = 320  # prompts whose K policy samples are scored by the verifier
    eft_k: int = 4
    corrupted: int = 320  # extra corrupted references: more low and middle scores
    ift_examples: int = 1200  # instruction examples mixed in, so generation is not forgotten
    epochs: int = 2
    learning_rate: float = 1e-3
    batch_size: int = 32
    eval_prompts: int = 64  # held-out prompts (x eval_k samples) for the agreement figures
    eval_k: int = 4
    max_new_tokens: int = 40
    threads: int = 1


@dataclass
class SelfJudgingWorld:
    path: Path  # checkpoint: generates answers and scores them with ``template``
    base: ToyWorld
    template: RubricTemplate
    stats: dict[str, Any]

    @property
    def task(self):
        return self.base.task


def build_self_judging_world(out_dir: str | Path, base: ToyWorld, config: SelfJudgingConfig | None = None,
                             force: bool = False) -> SelfJudgingWorld:
    """EFT the toy world's model into its own rubric judge (cached under ``out_dir``)."""
    out_dir = Path(out_dir)
    config = config or SelfJudgingConfig()
    base_digest = read_marker(base.path.parent, WORLD_MARKER)["digest"]
    digest = hashlib.sha256(json.dumps({"base": base_digest, "config": asdict(config),
                                        "template": asdict(TOY_RUBRIC)}, sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = out_dir / CHECKPOINT_DIR
    marker = read_marker(out_dir, MARKER)
    if not force and marker and marker.get("digest") == digest and (checkpoint / "config.json").is_file():
        return SelfJudgingWorld(checkpoint, base, TOY_RUBRIC, marker["stats"])

    from alignflow.feedback.generation.hf import cpu_threads

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with cpu_threads(config.threads):
        stats = _build(checkpoint, base, config)
    stats["build_seconds"] = round(time.perf_counter() - started, 2)
    write_marker(out_dir, {"digest": digest, "config": asdict(config), "stats": stats}, MARKER)
    return SelfJudgingWorld(checkpoint, base, TOY_RUBRIC, stats)


def _samples(generator, task, n: int, k: int, seed: int, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """n prompts x k policy samples at temperature 1, flattened."""
    from alignflow.schemas.generator import SamplingParams

    prompts = task.prompts(n, seed=seed)
    sampled = generator.generate(prompts, k, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed))
    return [p for p in prompts for _ in range(k)], [g.text for gens in sampled for g in gens]


def _agreement(model, tokenizer, prompts, responses, rewards) -> float:
    """Spearman correlation of the model's own rubric score with the verifier's reward."""
    import torch
    from scipy.stats import spearmanr

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.feedback.judges import RubricJudge

    judge = RubricJudge(HFGenerator(model, tokenizer, device="cpu", batch_size=64), template=TOY_RUBRIC)
    with torch.no_grad():
        scores = judge.score(prompts, responses)
    return float(spearmanr(scores, rewards)[0])


def _build(checkpoint: Path, base: ToyWorld, config: SelfJudgingConfig) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.feedback.eft import evaluation_examples
    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.trainers.sft import train_sft

    task = base.task
    seed = base.config.seed
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    generator = HFGenerator(model, tokenizer, device="cpu", batch_size=64)

    # EFT data: the policy's own samples (the scores it will meet) plus corrupted references
    prompts, responses = _samples(generator, task, config.eft_prompts, config.eft_k, seed + 2000, config.max_new_tokens)
    rng = random.Random(seed)
    extra = task.prompts(config.corrupted, seed=seed + 2001)
    prompts += extra
    responses += [task.corrupt(task.reference(p), rng) for p in extra]
    rewards = task.rewards(prompts, responses)
    eft = evaluation_examples(prompts, responses, rewards, TOY_RUBRIC)
    ift = task.sft_examples(config.ift_examples, seed=seed + 2002)
    examples = eft + ift
    random.Random(seed).shuffle(examples)

    held_p, held_r = _samples(generator, task, config.eval_prompts, config.eval_k, seed + 3000, config.max_new_tokens)
    held_rewards = task.rewards(held_p, held_r)
    before = _agreement(model, tokenizer, held_p, held_r, held_rewards)
    train_sft(model, tokenizer, examples, checkpoint, learning_rate=config.learning_rate,
              num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size, seed=seed,
              data_seed=seed, use_cpu=True, logging_steps=10_000, quiet=True)
    shutil.rmtree(checkpoint / "trainer-state", ignore_errors=True)
    after = _agreement(model, tokenizer, held_p, held_r, held_rewards)
    # the EFT'd model must still answer: its own samples' reward on the same held-out prompts
    _, own = _samples(HFGenerator(model, tokenizer, device="cpu", batch_size=64), task, config.eval_prompts,
                      config.eval_k, seed + 3000, config.max_new_tokens)
    return {"eft_examples": len(eft), "ift_examples": len(ift),
            "judge_spearman_before": round(before, 4), "judge_spearman_after": round(after, 4),
            "base_mean_reward": round(float(held_rewards.mean()), 4),
            "mean_reward": round(float(task.rewards(held_p, own).mean()), 4)}
