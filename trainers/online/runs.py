"""Run bookkeeping shared by the online trainers: set up (fingerprint, newest checkpoint, the
starting evaluation), resume into live objects, checkpoint progress, and close the report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from alignflow.schemas.generator import Messages, SamplingParams
from alignflow.schemas.online import OnlineReport
from alignflow.trainers.encoding import as_messages
from alignflow.trainers.online import checkpointing as ck
from alignflow.trainers.online.rollout import Spend, eval_sampling_of, evaluate


@dataclass
class RunStart:
    """What every online trainer sets up before its first step (see ``begin_run``)."""

    prompts: list[Messages]
    eval_prompts: list[Messages]
    eval_sampling: SamplingParams
    spend: Spend
    report: OnlineReport  # reward_before filled in
    first: dict  # the starting policy's evaluation (``evaluate``'s output)
    fingerprint: str = ""  # of the config and prompts (``run_fingerprint``); checkpoints carry it
    saved: dict | None = None  # the newest checkpoint of this run (``find_resume``), if any
    meta: dict | None = None


def begin_run(method: str, make_generator: Any, policy: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any],
              eval_prompts: Sequence[Any] | None, eval_reward_fn: Any, sampling: SamplingParams,
              eval_sampling: SamplingParams | None, seed: int, first: dict | None = None) -> RunStart:
    """Normalise the prompts, fix the evaluation sampling and measure the starting policy.

    ``first``: the starting policy's evaluation recorded by an earlier run (a resumed run
    passes its checkpoint's record instead of re-measuring the policy it no longer holds)."""
    prompts = [as_messages(p) for p in prompts]
    eval_prompts = [as_messages(p) for p in (eval_prompts or prompts)]
    eval_sampling = eval_sampling or eval_sampling_of(sampling, seed)
    report = OnlineReport(method=method)
    if first is None:
        first = evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling)
    report.reward_before = first["reward"]
    report.extra["eval_rewards_before"] = first["rewards"]
    return RunStart(prompts, eval_prompts, eval_sampling, Spend(), report, first)


def start_run(method: str, cfg: Any, checkpoint_dir: str | Path | None, make_generator: Any, policy: torch.nn.Module,
              tokenizer: Any, prompts: Sequence[Any], eval_prompts: Sequence[Any] | None, eval_reward_fn: Any,
              eval_sampling: SamplingParams | None) -> RunStart:
    """``begin_run`` for a resumable trainer whose config has ``sampling`` and ``seed``: the run's
    fingerprint, its newest checkpoint under ``checkpoint_dir`` (``saved`` / ``meta``, for
    ``resume_into``), and a starting evaluation taken from that checkpoint when there is one."""
    fingerprint = ck.run_fingerprint(cfg, [as_messages(p) for p in prompts])
    saved, meta = ck.find_resume(checkpoint_dir, fingerprint)
    run = begin_run(method, make_generator, policy, tokenizer, prompts, eval_prompts, eval_reward_fn, cfg.sampling,
                    eval_sampling, cfg.seed, first=meta["first"] if meta else None)
    run.fingerprint, run.saved, run.meta = fingerprint, saved, meta
    return run


def resume_into(run: RunStart, objects: dict[str, Any], gen: torch.Generator) -> tuple[Spend, int]:
    """Load the checkpoint ``start_run`` found into ``objects`` (name -> module or optimizer, the
    names it was saved under), the random streams and ``run.report``; returns (spend, index to
    continue from). Nothing found: (``run.spend``, 0)."""
    if run.saved is None:
        return run.spend, 0
    for name, obj in objects.items():
        obj.load_state_dict(run.saved[name])
    ck.set_rng_state(run.saved["rng"], gen)
    run.report.history = run.meta["history"]
    run.report.extra["resumed_from"] = run.meta["path"]
    return ck.spend_of(run.meta), run.meta["index"]


def save_progress(checkpoint_dir: str | Path | None, done: int, total: int, every: int, objects: dict[str, Any],
                  gen: torch.Generator, fingerprint: str, report: OnlineReport, spend: Spend, first: dict,
                  prefix: str = "step") -> None:
    """Checkpoint ``objects``' states and the random streams after ``done`` of ``total``
    steps (rounds): every ``every`` and at the end; nothing without a ``checkpoint_dir``."""
    if checkpoint_dir is None or (done % max(1, every) and done != total):
        return
    state = {name: obj.state_dict() for name, obj in objects.items()}
    ck.save_checkpoint(checkpoint_dir, ck.checkpoint_name(done, prefix), {**state, "rng": ck.rng_state(gen)},
                       ck.checkpoint_meta(done, fingerprint, report, spend, first))


def finish_run(report: OnlineReport, final: dict | None, spend: Spend, started: float) -> OnlineReport:
    """Fill the report's closing fields: the final ``evaluate`` (reward, KL, per-prompt
    rewards; ``None`` when the run was not evaluated), the spend and the wall time since
    ``started`` (``time.perf_counter``)."""
    if final is not None:
        report.reward_after, report.kl_to_ref = final["reward"], final["kl"]
        report.extra["eval_rewards_after"] = final["rewards"]
    report.generations, report.judge_calls = spend.generations, spend.judge_calls
    report.wall_s = time.perf_counter() - started
    return report
