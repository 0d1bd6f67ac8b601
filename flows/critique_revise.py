"""``critique_revise``: Constitutional AI critique-revision of responses (survey 3.2.1).

One Prefect task per shard of prompts: the model answers, critiques its answer against a
principle sampled from the constitution, and revises it, ``rounds`` times
(``feedback.constitutional``). Outputs: ``critiques`` (the full trace) and ``sft`` (final
revisions), ready for the SFT stage of ``align_from_prompts``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from alignflow.flows.config import CritiqueReviseConfig
from alignflow.flows.runtime import expand_output
from alignflow.flows.tasks import PlainSteps, PrefectSteps, shard_count, shard_seed


def run_critique_revise(config: CritiqueReviseConfig, steps: PlainSteps) -> dict:
    """The stages of ``critique_revise`` on any step runner; returns the output paths."""
    run = Path(config.output).resolve()
    gen = config.generation.model_dump()
    shards = shard_count(config.prompts, config.generation.shard_size)
    traces = steps.map("critique_shard", [
        dict(out=str(run / "shards" / f"critiques-{i:05d}"), prompts=str(config.prompts), shard=i,
             shard_size=config.generation.shard_size, model=str(config.model), backend=config.generation.backend,
             generation=gen, constitution=config.constitution, rounds=config.rounds,
             seed=shard_seed(config.seed, 0, i))
        for i in range(shards)])
    return steps.call("merge_critiques", out_dir=str(run), shards=traces)


_PROGRESS: list = [None]


@flow(name="critique-revise", log_prints=False, validate_parameters=False)
def critique_revise(config: dict[str, Any]) -> dict:
    """Constitutional critique-revision of a prompts dataset -> ``critiques`` and ``sft``."""
    cfg = CritiqueReviseConfig.model_validate(config)
    cfg.output = expand_output(cfg.output, cfg.name)
    steps = PrefectSteps(cfg.output, progress=_PROGRESS[0], retries=cfg.generation.retries,
                         retry_delays=cfg.generation.retry_delays)
    return run_critique_revise(cfg, steps)
