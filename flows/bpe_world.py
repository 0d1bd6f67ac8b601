"""The BPE world: the toy task on a real-shaped checkpoint (byte-level BPE, ChatML, tiny Qwen2).

``build_bpe_world(out_dir, seed)`` is ``build_toy_world``'s counterpart for code that must not
rely on the toy's shortcuts (one token per character, a bos, eos = a fixed id, the toy template):
the same task and reward (``feedback.toy_task.ToyTask``), a byte-level BPE tokenizer trained on
the task's corpus (``trainers.bpe_model``), a tiny Qwen2 with grouped-query attention and tied
embeddings, SFT on the same mixed-quality data, and the same reward measurement
(``toy_world.reward_stats`` on held-out prompts). The result is an ordinary checkpoint folder
plus a marker file ``bpe_world.json``; a second call with the same config returns at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignflow.feedback.toy_task import ToyTask
from alignflow.flows.toy_world import (
    ToyWorld,
    _no_progress_bars,
    evaluate_checkpoint,
    read_marker,
    write_marker,
)
from alignflow.schemas.store import sha256_file

MARKER = "bpe_world.json"
# Not the toy's "sft-model": a folder holding both worlds' markers must not mix their checkpoints.
CHECKPOINT_DIR = "bpe-sft-model"
WORLD_VERSION = 2  # 2: context 2048 (judge prompts fit)


@dataclass(frozen=True)
class BPEWorldConfig:
    """Everything that determines the built BPE world (its hash names a finished build)."""

    seed: int = 0
    n_sft_examples: int = 8_000
    num_merges: int = 400
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    learning_rate: float = 3e-3
    batch_size: int = 32
    warmup_steps: int = 30
    eval_prompts: int = 64
    eval_k: int = 4
    max_new_tokens: int = 40
    threads: int = 1  # torch CPU threads for SFT and evaluation (part of the hash: float order)

    def digest(self, task: ToyTask) -> str:
        payload = json.dumps({"world": "bpe", "version": WORLD_VERSION, "config": asdict(self),
                              "task": task.config()}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class BPEWorld(ToyWorld):
    """A built BPE world: checkpoint folder, task (prompts + reward), reward statistics."""

    config: BPEWorldConfig = field(default_factory=BPEWorldConfig)


def tokenizer_corpus(examples: list[tuple[str, str]]) -> list[str]:
    """The texts the tokenizer learns its merges from: each SFT conversation with its role names."""
    return [f"user\n{prompt}\nassistant\n{response}\n" for prompt, response in examples]


def build_bpe_world(out_dir: str | Path, seed: int = 0, task: ToyTask | None = None,
                    config: BPEWorldConfig | None = None, force: bool = False, **overrides: Any) -> BPEWorld:
    """Build (or reuse) the BPE world under ``out_dir``; arguments as ``build_toy_world``."""
    from alignflow.feedback.generation.hf import cpu_threads

    out_dir = Path(out_dir)
    task = task or ToyTask()
    config = config or BPEWorldConfig(seed=seed)
    if overrides or config.seed != seed:
        config = BPEWorldConfig(**{**asdict(config), **overrides, "seed": seed})
    digest = config.digest(task)
    marker = read_marker(out_dir, MARKER)
    checkpoint = out_dir / CHECKPOINT_DIR
    if not force and marker and marker.get("digest") == digest and (checkpoint / "config.json").is_file():
        return BPEWorld(path=checkpoint, task=task, stats=marker["stats"], config=config)

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with cpu_threads(config.threads), _no_progress_bars():
        _build_checkpoint(checkpoint, task, config)
        built = time.perf_counter()
        stats = evaluate_checkpoint(checkpoint, task, config)
    stats["build_seconds"] = round(built - started, 2)
    stats["weights_sha256"] = sha256_file(checkpoint / "model.safetensors")
    stats["eval_seconds"] = round(time.perf_counter() - built, 2)
    payload = {"digest": digest, "world": "bpe", "config": asdict(config), "task": task.config(), "stats": stats,
               "checkpoint": CHECKPOINT_DIR}
    write_marker(out_dir, payload, MARKER)
    return BPEWorld(path=checkpoint, task=task, stats=stats, config=config)


def _build_checkpoint(checkpoint: Path, task: ToyTask, config: BPEWorldConfig) -> None:
    """Data, BPE tokenizer trained on it, tiny Qwen2, SFT; the checkpoint folder is written last."""
    import shutil

    from alignflow.trainers.bpe_model import make_tiny_qwen2, save_tokenizer, train_bpe_tokenizer
    from alignflow.trainers.sft import train_sft

    if checkpoint.exists():
        shutil.rmtree(checkpoint)
    examples = task.sft_examples(config.n_sft_examples, seed=config.seed)
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(examples), num_merges=config.num_merges)
    model = make_tiny_qwen2(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
                            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, seed=config.seed)
    train_sft(model, tokenizer, examples, checkpoint, learning_rate=config.learning_rate,
              per_device_train_batch_size=config.batch_size, warmup_steps=config.warmup_steps,
              seed=config.seed, data_seed=config.seed, use_cpu=True, logging_steps=10_000, quiet=True)
    shutil.rmtree(checkpoint / "trainer-state", ignore_errors=True)
    save_tokenizer(tokenizer, checkpoint)
