"""``generate_feedback``: prompts -> K samples -> judge -> pairwise | listwise | binary dataset.

The single-stage flow that the nightly deployment of ``prefect.yaml`` runs. Generation and
judging are one Prefect task per shard (``generation.shard_size`` prompts), each returning the
output it finds in the run folder: a run killed in the middle of generation and started again
with the same folder redoes only the shards that had not finished, and its datasets equal those
of an uninterrupted run (same seeds per shard, same merge order).

Outputs in the run folder: ``shards/``, ``samples`` (all K samples with their ``reward``),
the ``pairwise`` / ``listwise`` / ``binary`` dataset, ``quarantine`` (if any row failed
validation) and ``feedback.json`` (counts and judge metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from alignflow.flows.config import GenerateFeedbackConfig
from alignflow.flows.runtime import expand_output
from alignflow.flows.tasks import PlainSteps, PrefectSteps, shard_count, shard_seed


def feedback_judge_spec(config: GenerateFeedbackConfig) -> dict:
    """The judge spec of a generate_feedback run (verifier by default: the toy task's reward)."""
    fb = config.feedback
    if fb.judge == "verifier":
        spec = {"type": "verifier", "task": {}}
        if config.verifier:
            spec["verifier"] = config.verifier
        return spec
    return {"type": fb.judge, "model": fb.judge_model or config.model, "backend": config.generation.backend}


def run_generate_feedback(config: GenerateFeedbackConfig, steps: PlainSteps) -> dict:
    """The stages of ``generate_feedback`` on any step runner; returns ``feedback.json``'s content."""
    run = Path(config.output).resolve()
    run.mkdir(parents=True, exist_ok=True)
    gen = config.generation.model_dump()
    judge = feedback_judge_spec(config)
    shards = shard_count(config.prompts, config.generation.shard_size)
    samples = steps.map("generate_shard", [
        dict(out=str(run / "shards" / f"samples-{i:05d}"), prompts=str(config.prompts), shard=i,
             shard_size=config.generation.shard_size, model=str(config.model), backend=config.generation.backend,
             generation=gen, k=config.generation.k, seed=shard_seed(config.seed, 0, i))
        for i in range(shards)])
    scored = steps.map("judge_shard", [
        dict(out=str(run / "shards" / f"scored-{i:05d}"), samples=path, judge=judge, seed=shard_seed(config.seed, 0, i))
        for i, path in enumerate(samples)])
    stats = steps.call("build_feedback", out_dir=str(run), shards=scored, kind=config.feedback.kind,
                       min_margin=config.feedback.min_margin,
                       provenance={"model": str(config.model), "judge": judge, "seed": config.seed,
                                   "prompts": str(config.prompts)})
    steps.table_artifact(f"{config.name}-{config.feedback.kind}", [
        {k: stats.get(k) for k in ("dataset", "kind", "rows", "quarantined", "dropped", "position_consistency",
                                    "length_bias", "reward_mean")}],
        description=f"generate_feedback: {stats['dataset']}")
    return stats


_PROGRESS: list = [None]


@flow(name="generate-feedback", log_prints=False, validate_parameters=False)
def generate_feedback(config: dict[str, Any]) -> dict:
    """Prompts -> K samples per prompt -> judge -> pairwise | listwise | binary dataset."""
    cfg = GenerateFeedbackConfig.model_validate(config)
    cfg.output = expand_output(cfg.output, cfg.name)
    steps = PrefectSteps(cfg.output, progress=_PROGRESS[0], retries=cfg.generation.retries,
                         retry_delays=cfg.generation.retry_delays)
    return run_generate_feedback(cfg, steps)
