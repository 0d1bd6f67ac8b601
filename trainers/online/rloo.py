"""REINFORCE Leave-One-Out (survey eq. 48, section 3.8.3).

For K on-policy samples ``y_1..y_K`` of one prompt with rewards ``r_i`` (the KL-penalised
sequence reward ``r(x, y_i) - beta * (log pi(y_i|x) - log pi_ref(y_i|x))``, as in the RLOO
paper), the gradient estimate is::

    (1/K) sum_i [ r_i - 1/(K-1) sum_{j != i} r_j ] grad log pi(y_i | x)        (48)

i.e. the loss ``-(1/K) sum_i A_i log pi(y_i|x)`` with the advantage held constant. The other
K-1 samples are the baseline, so no value network is needed. Sequence log-probs come from
``trainers.logprobs`` in one packed forward pass (the prompt computed once for its K samples).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alignflow.schemas.generator import Messages, SamplingParams
from alignflow.schemas.online import OnlineReport
from alignflow.trainers import modeling
from alignflow.trainers.logprobs import response_logps
from alignflow.trainers.online import rollout as ro
from alignflow.trainers.online import runs


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``A_i = r_i - mean_{j != i} r_j`` along the last axis: ``[B, K]`` -> ``[B, K]`` (K >= 2)."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("RLOO needs K >= 2 samples per prompt")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def rloo_loss(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient is eq. 48: ``-mean_{b,i} A_bi * log pi(y_bi|x_b)``, A constant."""
    return -(advantages.detach() * logps).mean()


@dataclass
class RLOOConfig:
    steps: int = 10
    prompts_per_step: int = 8
    k: int = 4  # samples per prompt
    beta: float = 0.05  # KL penalty inside the reward
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    normalize_advantages: bool = False
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=24))
    layout: str = "packed"
    seed: int = 0
    checkpoint_every: int = 10  # steps between checkpoints (and one at the end) when a checkpoint_dir is given




def train_rloo(policy: nn.Module, tokenizer: Any, prompts: Sequence[Messages], make_generator: Any,
               reward_fn: Any, config: RLOOConfig | None = None, ref: nn.Module | None = None,
               eval_prompts: Sequence[Messages] | None = None,
               eval_sampling: SamplingParams | None = None, eval_reward_fn: Any = None,
               checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, OnlineReport]:
    """Train ``policy`` in place with RLOO (eq. 48); returns (policy, report).

    ``checkpoint_dir``: save policy, optimizer, RNG states and the record every
    ``checkpoint_every`` steps and at the end; a call with the same folder, config and prompts
    (``policy`` = the same starting weights) resumes from the newest checkpoint."""
    eval_reward_fn = eval_reward_fn or reward_fn  # e.g. the verifier when training on a reward model
    cfg = config or RLOOConfig()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ref = ref if ref is not None else modeling.frozen_copy(policy)
    optimizer = modeling.make_optimizer(policy.parameters(), modeling.OptimConfig(lr=cfg.lr))
    params = [p for p in policy.parameters() if p.requires_grad]
    run = runs.start_run("rloo", cfg, checkpoint_dir, make_generator, policy, tokenizer, prompts, eval_prompts,
                       eval_reward_fn, eval_sampling)
    prompts, eval_prompts, eval_sampling, spend, report = (run.prompts, run.eval_prompts, run.eval_sampling,
                                                           run.spend, run.report)
    modeling.colocate(ref, policy)  # the generator factory may have moved the policy
    state = {"policy": policy, "optimizer": optimizer}  # what a checkpoint holds besides the random streams
    spend, start = runs.resume_into(run, state, gen)
    generator = make_generator(policy, tokenizer)
    for step in range(start, cfg.steps):
        idx = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        policy.eval()
        gens = ro.sample(generator, batch_prompts, cfg.k, cfg.sampling, spend)
        texts = [[g.text for g in gs] for gs in gens]
        finished = [ro.finished_flags(gs, cfg.sampling.max_new_tokens) for gs in gens]
        flat_p = [p for p, gs in zip(batch_prompts, gens) for _ in gs]
        scores = ro.score(reward_fn, flat_p, [t for ts in texts for t in ts], spend,
                          device=modeling.device_of(policy)).view(len(gens), cfg.k)
        policy.train()
        logps, _ = response_logps(policy, tokenizer, batch_prompts, texts, finished, cfg.layout)
        with torch.no_grad():
            ref_logps, _ = response_logps(ref, tokenizer, batch_prompts, texts, finished, cfg.layout)
            kl = logps.detach() - ref_logps.to(logps.device)
            adv = leave_one_out_advantages(scores - cfg.beta * kl)
            if cfg.normalize_advantages:
                adv = adv / adv.std().clamp_min(1e-6)
        loss = rloo_loss(logps, adv)
        modeling.step(optimizer, loss, params, cfg.max_grad_norm)
        report.history.append({"step": step, "reward": float(scores.mean()), "kl": float(kl.mean()),
                               "loss": loss.item()})
        runs.save_progress(checkpoint_dir, step + 1, cfg.steps, cfg.checkpoint_every, state, gen, run.fingerprint,
                         report, spend, run.first)
    policy.eval()
    final = ro.evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling, ref=ref)
    runs.finish_run(report, final, spend, t0)
    return policy, report
