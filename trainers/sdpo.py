"""sDPO (survey 3.3.7): stepwise DPO over dataset chunks, each stage's result the next reference.

The preference data is split into S chunks used one after another. Stage s trains on chunk s
with the loss of choice (DPO by default) against the reference ``pi_ref^(s)``: the initial
model for s = 0, the policy at the end of stage s - 1 after that (a better-aligned reference is
a tighter lower bound, the premise of sDPO). Because the reference changes per stage, the
reference columns of chunk s are recomputed with ``pi_ref^(s)`` just before stage s; within a
stage the reference is never loaded as a separate model (the policy at the start of the stage
IS the reference, and its log-probs are computed once).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

from alignflow.trainers.precompute import fill_reference_logps
from alignflow.trainers.preference import PreferenceTrainer


def split_chunks(examples: Sequence[dict], stages: int | Sequence[int]) -> list[list[dict]]:
    """``stages`` contiguous chunks of (nearly) equal size, or chunks of the given sizes.

    Data order is kept: order the data before (e.g. an easier source first, as the sDPO paper
    uses OpenOrca before UltraFeedback).
    """
    examples = list(examples)
    if isinstance(stages, int):
        if not 1 <= stages <= len(examples):
            raise ValueError(f"sDPO needs 1 <= stages <= number of examples ({len(examples)}), got {stages}")
        bounds = [round(i * len(examples) / stages) for i in range(stages + 1)]
    else:
        sizes = list(stages)
        if sum(sizes) != len(examples) or any(s <= 0 for s in sizes):
            raise ValueError(f"chunk sizes {sizes} must be positive and add up to {len(examples)} examples")
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [examples[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]


def train_sdpo(model, args, examples: Sequence[dict], *, kind: str = "pairwise", stages: int | Sequence[int] = 2,
               loss: str = "dpo", loss_params: dict[str, Any] | None = None, pad_token_id: int = 0,
               layout: str = "packed", ref_batch_size: int = 32, **trainer_kwargs) -> list[dict]:
    """Train ``model`` in place stage by stage; returns one record per stage.

    args: ``TrainingArguments`` (each stage writes under ``<output_dir>/stage-<s>``).
    Each record: stage, rows, reference ("initial model" or "policy after stage s-1"), the
    reference log-probs used (for checking), and the stage's log history.
    """
    chunks = split_chunks(examples, stages)
    records = []
    for s, chunk in enumerate(chunks):
        chunk = [{k: v for k, v in ex.items() if k not in ("ref_logps", "ref_kl_logps")} for ex in chunk]
        # the reference of stage s is the model as it stands now (stage s-1's result)
        fill_reference_logps(model, chunk, pad_token_id, batch_size=ref_batch_size, with_kl=loss == "kto",
                             layout=layout)
        stage_args = dataclasses.replace(copy.copy(args), output_dir=str(Path(args.output_dir) / f"stage-{s}"))
        trainer = PreferenceTrainer(model, stage_args, chunk, kind=kind, loss=loss, loss_params=loss_params,
                                    pad_token_id=pad_token_id, layout=layout, **trainer_kwargs)
        result = trainer.train()
        records.append({
            "stage": s,
            "rows": len(chunk),
            "reference": "initial model" if s == 0 else f"policy after stage {s - 1}",
            "ref_logps": [ex["ref_logps"] for ex in chunk],
            "train_loss": result.training_loss,
            "log_history": trainer.state.log_history,
        })
    return records
