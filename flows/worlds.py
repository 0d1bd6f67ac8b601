"""The embedded worlds, selectable wherever a run needs a starting checkpoint and a task:

- ``toy``: a character-level tokenizer and a tiny Llama (``flows.toy_world``), the default;
- ``bpe``: a byte-level BPE tokenizer with a ChatML template and a tiny Qwen2 with grouped-query
  attention (``flows.bpe_world``), shaped like a released chat checkpoint.

Both fit the same synthetic task (``feedback.toy_task.ToyTask``) to the same reward range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WORLDS = ("toy", "bpe")


def build_embedded_world(world: str, out_dir: str | Path, seed: int = 0, **kwargs: Any):
    """Build (or reuse) the named world under ``out_dir``; ``kwargs`` as ``build_toy_world``
    (``task``, ``config``, ``force`` and config field overrides)."""
    if world == "toy":
        from alignflow.flows.toy_world import build_toy_world

        return build_toy_world(out_dir, seed=seed, **kwargs)
    if world == "bpe":
        from alignflow.flows.bpe_world import build_bpe_world

        return build_bpe_world(out_dir, seed=seed, **kwargs)
    raise ValueError(f"unknown world {world!r}; known: {', '.join(WORLDS)}")
