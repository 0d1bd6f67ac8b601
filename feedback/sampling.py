"""Prompts -> K samples per prompt: the ``samples`` kind (DESIGN.md).

``sample_table(prompts, generator, k, sampling)`` is a plain function of an Arrow table, for
flows to compose; ``sample_dataset(in_path, out_path, generator, ...)`` reads and writes store
datasets with provenance (model, backend, sampling, seed, parent dataset). Deterministic given
``sampling.seed`` (backends seed each (prompt, sample) stream from it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from alignflow.schemas.generator import SamplingParams
from alignflow.schemas.prompts import to_messages_array


def generator_provenance(generator: Any) -> dict:
    prov = getattr(generator, "provenance", None)
    if callable(prov):
        return prov()
    return {"backend": getattr(generator, "name", type(generator).__name__),
            "model": str(getattr(generator, "model_name", getattr(generator, "model", "")))[:200]}


def model_label(generator: Any) -> str:
    prov = generator_provenance(generator)
    return f"{prov.get('backend', '?')}:{prov.get('model', '?')}"


def sample_table(prompts: pa.Table, generator: Any, k: int = 4, sampling: SamplingParams | None = None,
                 batch_size: int = 64, progress: Callable[[int], None] | None = None,
                 stats: dict | None = None) -> pa.Table:
    """``k`` responses per prompt row -> ``samples`` rows (prompt-major, sample order kept).

    A prompt longer than the model's context minus ``max_new_tokens`` is cut by the rule of
    ``feedback.context`` (each turn keeps its head, in equal shares) before it is sent; the rows
    keep the full prompt, and ``stats["truncated"]`` counts the prompts cut."""
    from alignflow.feedback.context import fit_conversation, fitter_for
    from alignflow.schemas.prompts import normalize_prompt_columns

    prompts = normalize_prompt_columns(prompts)
    sampling = sampling or SamplingParams()
    fitter = fitter_for(generator, what="generation prompt")
    messages = [fit_conversation(fitter, m, sampling.max_new_tokens) for m in prompts.column("prompt").to_pylist()]
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + fitter.truncated
    texts, logps, n_tokens = [], [], []
    for start in range(0, len(messages), batch_size):
        chunk = messages[start: start + batch_size]
        # a per-chunk seed keeps results independent of how many chunks ran before a restart
        chunk_sampling = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + start)
        for gens in generator.generate(chunk, k, chunk_sampling):
            for g in gens:
                texts.append(g.text)
                logps.append(g.logp)
                n_tokens.append(g.n_tokens)
        if progress:
            progress(len(chunk))
    rows = pa.array(np.repeat(np.arange(len(messages)), k), pa.int64())
    base = prompts.select(["prompt_id", "prompt"]).take(rows)
    return pa.table({
        "prompt_id": base.column("prompt_id"), "prompt": to_messages_array(base.column("prompt")),
        "response": pa.array(texts, pa.string()),
        "model": pa.array([model_label(generator)] * len(texts), pa.string()),
        "logp": pa.array(logps, pa.float64()), "n_tokens": pa.array(n_tokens, pa.int64()),
    })


def sample_dataset(prompts_path: str | Path, out_path: str | Path, generator: Any, k: int = 4,
                   sampling: SamplingParams | None = None, *, batch_size: int = 64, overwrite: bool = False,
                   progress: Callable[[int], None] | None = None) -> Path:
    from alignflow.schemas.store import read_dataset, write_dataset

    sampling = sampling or SamplingParams()
    stats: dict = {}
    table = sample_table(read_dataset(prompts_path), generator, k, sampling, batch_size, progress, stats=stats)
    provenance = {"flow": "generate", "models": {"policy": generator_provenance(generator)}, "k": k,
                  "sampling": dataclasses.asdict(sampling), "seed": sampling.seed,
                  "parent_datasets": [str(prompts_path)], "truncated_to_context": stats.get("truncated", 0)}
    return write_dataset(out_path, table, "samples", provenance, overwrite=overwrite)
