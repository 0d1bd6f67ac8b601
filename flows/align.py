"""``align_from_prompts``: prompts -> samples -> AI feedback -> dataset -> training, iterated.

One iteration t (each arrow a Prefect task; generation and judging one task per shard):

    prompts_t --generate (K per prompt)--> samples --judge--> scored samples
        --best/worst | all K | above-mean--> pairwise | listwise | binary dataset
        --reference log-probs (ref_* columns)--> --train (loss of the table)--> policy_t
        --evaluate on held-out prompts--> reward_t, KL(policy_t || policy_0)

before the first iteration an optional Constitutional SFT stage (critique-revise, then SFT on
the revisions) replaces the starting policy. The reference of iteration t is the policy that
sampled its data (iterative DPO's refresh) or the starting policy (``train.reference``).

Termination (``trainers.online.termination``): after iteration t, stop when the held-out
win-rate of t over t-1 (per prompt, by the judge's reward) is not significantly above one half
(one-sided binomial test at ``termination.alpha``) or the held-out reward stopped rising; the
evidence of every iteration goes into ``report.json``.

The run folder holds everything: ``config.yaml``, per iteration ``iter-<t>/`` with the shard
datasets, ``samples``, the preference dataset, its ``-ref`` copy, ``model/`` and
``eval.json``; then ``report.json`` and ``reward_kl.png``. Rerunning with the same folder
resumes: each finished step and shard finds its output and returns it (no Prefect cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow

from alignflow.flows.config import AlignConfig
from alignflow.flows.runtime import expand_output
from alignflow.flows.tasks import PlainSteps, PrefectSteps, shard_count, shard_seed

HELDOUT_SEED_OFFSET = 7_919  # held-out prompts come from another seed than any training draw


def needs_reference(loss: str, kind: str) -> bool:
    """Whether ``loss`` on ``kind`` data reads reference log-probs (trainers.preference decides)."""
    from alignflow.trainers.preference import needs_reference as trainer_needs_reference

    return trainer_needs_reference(loss, kind)


def judge_spec(config: AlignConfig, task: dict, initial_model: str) -> dict:
    """The JSON-able judge spec of a run (what ``flows.tasks.make_judge`` builds)."""
    fb = config.feedback
    if fb.judge == "verifier":
        return {"type": "verifier", "name": "toy_task.reward", "task": task}
    return {"type": fb.judge, "model": fb.judge_model or initial_model, "backend": config.generation.backend}


def world_step(config: AlignConfig, run: Path) -> dict:
    """Arguments of the world step of a run (the same in and outside the flow)."""
    return dict(out=str(run / f"{config.world}-world"), seed=config.seed, options=config.toy_world, world=config.world)


def prepare_outside_flow(config: AlignConfig, progress=None) -> None:
    """Build the embedded world before the flow starts (overlapping the embedded server's start-up).

    The flow's own ``build_world`` step then finds it finished (the step is idempotent).
    """
    if config.model is not None:
        return
    run = Path(config.output).resolve()
    PlainSteps(run, progress).call("build_world", **world_step(config, run))  # recorded like the flow's steps


def run_align(config: AlignConfig, steps: PlainSteps) -> dict:
    """The pipeline of ``align_from_prompts`` on any step runner (Prefect or plain calls)."""
    run = Path(config.output).resolve()
    run.mkdir(parents=True, exist_ok=True)
    gen = config.generation.model_dump()
    task_cfg: dict = {}
    world: dict = {}
    if config.model is None:
        world = steps.call("build_world", **world_step(config, run))
        initial, task_cfg = world["path"], world.get("task", {})
    else:
        initial = str(config.model)
    judge = judge_spec(config, task_cfg, initial)

    source, held_source = config.prompts, config.prompts
    if config.prompts is not None:  # any prompts dataset or file convert reads, as a prompts dataset
        source = held_source = steps.call("import_prompts", out=str(run / "prompts" / "source"),
                                          source=config.prompts, source_format=config.prompts_format)
    if config.eval_prompts is not None:
        if config.prompts is None:
            raise ValueError("eval_prompts needs prompts (the toy task draws its own held-out prompts)")
        held_source = steps.call("import_prompts", out=str(run / "prompts" / "heldout-source"),
                                 source=config.eval_prompts)
    if judge["type"] == "verifier" and config.prompts is not None:
        from alignflow.flows.tasks import check_toy_prompts

        for dataset in {source, held_source}:
            check_toy_prompts(dataset, "verifier")
    heldout = steps.call("prepare_prompts", out=str(run / "prompts" / "heldout"), n=config.eval.n_prompts,
                         seed=config.seed + HELDOUT_SEED_OFFSET, source=held_source, task=task_cfg)
    policy = initial
    if config.constitutional.enabled:
        policy = _constitutional_sft(config, steps, run, initial, task_cfg, gen, source)

    def evaluate(model: str, name: str) -> dict:
        return steps.call("evaluate_policy", out=str(run / name / "eval.json"), model=model, initial=initial,
                          prompts=heldout, judge=judge, k=config.eval.k, temperature=config.eval.temperature,
                          max_new_tokens=config.generation.max_new_tokens, seed=config.seed + 1,
                          backend=config.generation.backend, generation=gen)

    history = [dict(evaluate(policy, "iter-0"), iteration=0)]
    stop_reason = f"ran all {config.iterations} iterations"
    for t in range(1, config.iterations + 1):
        it = run / f"iter-{t}"
        prompts = steps.call("prepare_prompts", out=str(it / "prompts"), n=config.n_prompts,
                             seed=config.seed + (t if config.fresh_prompts else 0), source=source,
                             task=task_cfg, exclude=heldout)
        feedback = _feedback_stage(config, steps, it, prompts, policy, judge, gen, t)
        reference = policy if config.train.reference == "previous" else initial
        with_ref = feedback["dataset"]
        if needs_reference(config.train.loss, config.feedback.kind):  # reference-free losses skip it
            with_ref = steps.call("precompute_reference", out=str(it / f"{config.feedback.kind}-ref"),
                                  dataset=feedback["dataset"], reference=reference)
        trained = steps.call("train_policy", out=str(it / "model"), dataset=with_ref, model=policy,
                             train=config.train.model_dump(), seed=config.train.seed + t)
        result = dict(evaluate(trained, f"iter-{t}"), iteration=t, dataset=feedback["dataset"],
                      reward_before=feedback["reward_mean"], rows=feedback["rows"],
                      quarantined=feedback["quarantined"])
        history.append(result)
        steps.table_artifact(f"iter-{t}-{config.feedback.kind}", [_artifact_row(feedback, result)],
                             description=f"{config.name}: iteration {t} {config.feedback.kind} dataset "
                                         f"({feedback['dataset']})")
        policy = trained
        stop, why, evidence = should_stop(history, config)
        history[-1]["termination"] = evidence
        if stop:
            stop_reason = why
            break
    report = {"name": config.name, "run_dir": str(run), "initial_model": initial, "final_model": policy,
              "loss": config.train.loss, "kind": config.feedback.kind, "judge": judge.get("type"),
              "stop_reason": stop_reason, "history": history, "world": config.world if world else None,
              "world_stats": world.get("stats")}
    _write_json(run / "report.json", report)
    report["plot"] = str(plot_history(history, run / "reward_kl.png", title=f"{config.name}: {config.train.loss}"))
    _write_json(run / "report.json", report)
    return report


def _feedback_stage(config: AlignConfig, steps: PlainSteps, it: Path, prompts: str, policy: str, judge: dict,
                    gen: dict, t: int) -> dict:
    """Generate K samples per prompt and judge them, shard by shard, then build the dataset."""
    shards = shard_count(prompts, config.generation.shard_size)
    samples = steps.map("generate_shard", [
        dict(out=str(it / "shards" / f"samples-{i:05d}"), prompts=prompts, shard=i,
             shard_size=config.generation.shard_size, model=policy, backend=config.generation.backend,
             generation=gen, k=config.generation.k, seed=shard_seed(config.seed, t, i))
        for i in range(shards)])
    scored = steps.map("judge_shard", [
        dict(out=str(it / "shards" / f"scored-{i:05d}"), samples=path, judge=judge)
        for i, path in enumerate(samples)])
    return steps.call("build_feedback", out_dir=str(it), shards=scored, kind=config.feedback.kind,
                      min_margin=config.feedback.min_margin,
                      provenance={"model": policy, "judge": judge, "iteration": t, "seed": config.seed})


def _constitutional_sft(config: AlignConfig, steps: PlainSteps, run: Path, initial: str, task_cfg: dict,
                        gen: dict, source: str | None) -> str:
    """Critique-revise responses to training prompts, then SFT the starting policy on the revisions."""
    cai = run / "constitutional"
    prompts = steps.call("prepare_prompts", out=str(cai / "prompts"), n=config.n_prompts, seed=config.seed,
                         source=source, task=task_cfg,
                         exclude=str(run / "prompts" / "heldout"))
    shards = shard_count(prompts, config.generation.shard_size)
    traces = steps.map("critique_shard", [
        dict(out=str(cai / "shards" / f"critiques-{i:05d}"), prompts=prompts, shard=i,
             shard_size=config.generation.shard_size, model=initial, backend=config.generation.backend,
             generation=gen, constitution=config.constitutional.constitution, rounds=config.constitutional.rounds,
             seed=shard_seed(config.seed, 0, i))
        for i in range(shards)])
    merged = steps.call("merge_critiques", out_dir=str(cai), shards=traces)
    return steps.call("sft_policy", out=str(cai / "model"), dataset=merged["sft"], model=initial,
                      epochs=config.constitutional.epochs, seed=config.seed)


def termination_evidence(history: list[dict], config: AlignConfig) -> dict:
    """Win-rate of the newest iterate over the previous one on the held-out prompts, tested.

    A prompt is a win when its mean reward over the k held-out samples rose by more than
    ``tie_band``, a loss when it fell by more, else a tie (same prompts and seeds each time).
    """
    from alignflow.trainers.online.termination import winrate_test

    new = np.asarray(history[-1]["prompt_rewards"])
    old = np.asarray(history[-2]["prompt_rewards"])
    band = config.termination.tie_band
    wins, losses = int((new > old + band).sum()), int((new < old - band).sum())
    evidence = winrate_test(wins, losses, len(new) - wins - losses, alpha=config.termination.alpha)
    evidence["reward_gain"] = float(history[-1]["reward"] - history[-2]["reward"])
    return evidence


def should_stop(history: list[dict], config: AlignConfig) -> tuple[bool, str, dict | None]:
    """The termination rule after the newest iteration: (stop, reason, evidence)."""
    from alignflow.trainers.online.termination import should_stop as rule_says_stop

    if len(history) < 2:
        return False, "", None
    evidence = termination_evidence(history, config)
    rewards = [h["reward"] for h in history]
    rule = config.termination.rule
    if rule == "none":
        return False, "", evidence
    stop, why = rule_says_stop(evidence if rule == "winrate" else None, rewards, config.termination.min_gain)
    return stop, why, evidence


def _artifact_row(feedback: dict, result: dict) -> dict:
    """The per-dataset table artifact: rows, quarantined, judge metrics, reward before/after."""
    def fmt(x):
        return None if x is None else round(float(x), 4)

    return {"dataset": feedback["dataset"], "kind": feedback["kind"], "rows": feedback["rows"],
            "quarantined": feedback["quarantined"], "dropped": feedback["dropped"],
            "position_consistency": fmt(feedback.get("position_consistency")),
            "length_bias": fmt(feedback.get("length_bias")), "reward_before": fmt(feedback["reward_mean"]),
            "reward_after": fmt(result["reward"]), "kl_after": fmt(result["kl"])}


def plot_history(history: list[dict], path: Path, title: str = "") -> Path:
    """PNG of held-out reward and KL to the starting policy against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot(iters, [h["reward"] for h in history], "o-", color="tab:blue", label="held-out reward")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward", color="tab:blue")
    ax.set_xticks(iters)
    ax2 = ax.twinx()
    ax2.plot(iters, [h["kl"] for h in history], "s--", color="tab:red", label="KL to start")
    ax2.set_ylabel("KL(pi_t || pi_0)", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# The Prefect flow
# ---------------------------------------------------------------------------------------------

_PROGRESS: list = [None]


def set_progress(callback) -> None:
    """Progress callback ``(stage, done, total)`` for the next flow runs (the CLI's rich bars)."""
    _PROGRESS[0] = callback


@flow(name="align-from-prompts", log_prints=False, validate_parameters=False)
def align_from_prompts(config: dict[str, Any]) -> dict:
    """Prompts -> K samples -> AI feedback -> dataset -> reference log-probs -> training, iterated.

    ``config``: the fields of ``flows.config.AlignConfig``.
    """
    cfg = AlignConfig.model_validate(config)
    cfg.output = expand_output(cfg.output, cfg.name)
    steps = PrefectSteps(cfg.output, progress=_PROGRESS[0], retries=cfg.generation.retries,
                         retry_delays=cfg.generation.retry_delays)
    return run_align(cfg, steps)
