"""The toy world: a char-level tiny Llama fitted (SFT) to a synthetic task of mixed quality.

``build_toy_world(out_dir, seed)`` assembles a feedback part (``feedback.toy_task.ToyTask``: the
prompts, the SFT data, the reward) with a trainer part (``trainers.toy_model`` and
``trainers.sft.train_sft``), then measures the reward of samples at temperature 1 with the
``hf`` generator. The result is an ordinary checkpoint folder plus a marker file
``toy_world.json`` (config, config hash, stats); a second call with the same config finds the
marker and returns at once.

Everything runs on the CPU whatever the machine (the model has ~0.5 M parameters) so the
same seed gives the same weights everywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alignflow.feedback.toy_task import ToyTask
from alignflow.schemas.store import sha256_file

MARKER = "toy_world.json"
CHECKPOINT_DIR = "sft-model"
WORLD_VERSION = 2  # 2: context 2048 (model and tokenizer); a world cached at 256 is rebuilt


@dataclass(frozen=True)
class ToyWorldConfig:
    """Everything that determines the built world (its hash names a finished build)."""

    seed: int = 0
    n_sft_examples: int = 8_000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    learning_rate: float = 3e-3
    batch_size: int = 32
    warmup_steps: int = 30
    eval_prompts: int = 64
    eval_k: int = 4
    max_new_tokens: int = 40
    threads: int = 1  # torch CPU threads for SFT and evaluation (part of the hash: float order)

    def digest(self, task: ToyTask) -> str:
        payload = json.dumps({"version": WORLD_VERSION, "config": asdict(self), "task": task.config()},
                             sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ToyWorld:
    """A built toy world: checkpoint folder, task (prompts + reward), reward statistics."""

    path: Path
    task: ToyTask
    stats: dict[str, Any]
    config: ToyWorldConfig = field(default_factory=ToyWorldConfig)

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        return self.task.prompts(n, seed)


def reward_stats(generator, task: ToyTask, prompts: Sequence[str], k: int = 4, seed: int = 0,
                 max_new_tokens: int = 40, temperature: float = 1.0) -> dict[str, float]:
    """Sample ``k`` responses per prompt and summarise the task reward.

    Returns mean reward and length-free quality, the mean over prompts of the within-prompt
    standard deviation of the k rewards, the share of prompts whose k rewards are not all
    equal (those yield preference pairs), the mean response length in characters and the
    share of exactly correct answers.
    """
    import numpy as np

    from alignflow.schemas.generator import SamplingParams

    messages = [[{"role": "user", "content": p}] for p in prompts]
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    generations = generator.generate(messages, n=k, sampling=sampling)
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat_texts = [g.text for gens in generations for g in gens]
    rewards = task.rewards(flat_prompts, flat_texts).reshape(len(prompts), k)  # [P, K]
    quality = task.qualities(flat_prompts, flat_texts).reshape(len(prompts), k)
    exact = np.array([t.strip() == task.reference(p) for p, t in zip(flat_prompts, flat_texts)])
    spread = rewards.max(axis=1) - rewards.min(axis=1)
    return {
        "mean_reward": float(rewards.mean()),
        "mean_quality": float(quality.mean()),
        "within_prompt_std": float(rewards.std(axis=1).mean()),
        "frac_prompts_with_spread": float((spread > 1e-9).mean()),
        "mean_max_minus_min": float(spread.mean()),
        "exact_match": float(exact.mean()),
        "mean_length": float(np.mean([len(t) for t in flat_texts])),
        "n_prompts": len(prompts),
        "k": k,
        "temperature": temperature,
    }


def read_marker(out_dir: Path, name: str = MARKER) -> dict | None:
    """A cached build's marker (digest, config, stats), or None when absent or unreadable."""
    try:
        return json.loads((out_dir / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(out_dir: Path, payload: dict, name: str = MARKER) -> None:
    """Write a build's marker atomically: the last step of a build, so a marker means finished."""
    tmp = out_dir / f".{name}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out_dir / name)


def build_toy_world(out_dir: str | Path, seed: int = 0, task: ToyTask | None = None,
                    config: ToyWorldConfig | None = None, force: bool = False, **overrides: Any) -> ToyWorld:
    """Build (or reuse) the toy world under ``out_dir``; returns a ``ToyWorld``.

    Args:
        out_dir: folder for the checkpoint (``out_dir/sft-model``) and the marker file.
        seed: seeds the SFT data, the initial weights, the data order and the evaluation.
        task: the task (default ``ToyTask()``, length-neutral reward).
        config: model/SFT/evaluation sizes (default ``ToyWorldConfig(seed=seed)``).
        force: rebuild even when a finished build with the same config is present.
        **overrides: fields of ``ToyWorldConfig`` to change (e.g. ``n_sft_examples=2000``).
    """
    out_dir = Path(out_dir)
    task = task or ToyTask()
    config = config or ToyWorldConfig(seed=seed)
    if overrides or config.seed != seed:
        config = ToyWorldConfig(**{**asdict(config), **overrides, "seed": seed})
    digest = config.digest(task)
    marker = read_marker(out_dir)
    checkpoint = out_dir / CHECKPOINT_DIR
    if not force and marker and marker.get("digest") == digest and (checkpoint / "config.json").is_file():
        return ToyWorld(path=checkpoint, task=task, stats=marker["stats"], config=config)

    from alignflow.feedback.generation.hf import cpu_threads

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # One thread by default: as fast as two for a model this small, immune to a busy machine's
    # OpenMP spinning, and the same float summation order everywhere (same weights).
    with cpu_threads(config.threads), _no_progress_bars():
        _build_checkpoint(checkpoint, task, config)
        built = time.perf_counter()
        stats = evaluate_checkpoint(checkpoint, task, config)
    stats["build_seconds"] = round(built - started, 2)
    stats["weights_sha256"] = sha256_file(checkpoint / "model.safetensors")
    stats["eval_seconds"] = round(time.perf_counter() - built, 2)
    payload = {"digest": digest, "config": asdict(config), "task": task.config(), "stats": stats,
               "checkpoint": CHECKPOINT_DIR}
    write_marker(out_dir, payload)
    return ToyWorld(path=checkpoint, task=task, stats=stats, config=config)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' weight loading/saving bars off during the build (restored after)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _build_checkpoint(checkpoint: Path, task: ToyTask, config: ToyWorldConfig) -> None:
    """Data, tokenizer, tiny Llama, SFT; the checkpoint folder is written last."""
    import shutil

    from alignflow.trainers.sft import train_sft
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    examples = task.sft_examples(config.n_sft_examples, seed=config.seed)
    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                            num_heads=config.num_heads, seed=config.seed)
    train_sft(model, tokenizer, examples, checkpoint, learning_rate=config.learning_rate,
              per_device_train_batch_size=config.batch_size, warmup_steps=config.warmup_steps,
              seed=config.seed, data_seed=config.seed, use_cpu=True, logging_steps=10_000, quiet=True)
    shutil.rmtree(checkpoint / "trainer-state", ignore_errors=True)


def evaluate_checkpoint(checkpoint: Path, task: ToyTask, config: ToyWorldConfig) -> dict[str, Any]:
    """``reward_stats`` of the checkpoint on held-out prompts (seed + 1000), on the CPU."""
    from alignflow.feedback.generation.hf import HFGenerator

    generator = HFGenerator(checkpoint, device="cpu", batch_size=256, num_threads=config.threads)
    prompts = task.prompts(config.eval_prompts, seed=config.seed + 1000)
    return reward_stats(generator, task, prompts, k=config.eval_k, seed=config.seed,
                        max_new_tokens=config.max_new_tokens)
