"""PPO for language models (survey eq. 2, InstructGPT), with PPO-ptx.

Objective (eq. 2)::

    max_pi  E_x E_{y~pi} [ r(x, y) ] - beta * KL(pi || pi_ref)  +  gamma * E_{x~D_pretrain} log pi(x)

realised the usual way (token-level MDP):

- per-token reward ``R_t = -beta * (log pi_old(a_t) - log pi_ref(a_t))``, plus the sequence
  reward ``r(x, y)`` on the last response token (``kl_penalized_rewards``);
- a value head ``V(s_t)`` on the policy's last hidden state; generalised advantage estimation
  ``delta_t = R_t + g V_{t+1} - V_t``, ``A_t = delta_t + g l A_{t+1}``, ``V_{T} = 0`` (``gae``);
- clipped surrogate ``max(-A rho, -A clip(rho, 1-e, 1+e))``, ``rho = pi/pi_old``
  (``clipped_policy_loss``) and clipped value loss
  ``0.5 max((V - G)^2, (V_old + clip(V - V_old, -e_v, e_v) - G)^2)`` (``clipped_value_loss``);
- PPO-ptx: ``gamma`` times the mean per-token NLL of pretraining text (``ptx_loss``).

All per-token tensors are ``[B, T-1]`` indexed by action (see ``trainers.encoding``).
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
from alignflow.trainers import encoding, modeling
from alignflow.trainers.online import rollout as ro
from alignflow.trainers.online import runs


# --------------------------------------------------------------------------------------------
# Pure functions (each unit-tested against a hand computation)
# --------------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` holds (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over masked positions (population variance); zero elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def last_action_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last response action: ``[B, T-1]`` bool -> ``[B]`` long."""
    cols = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, cols, torch.full_like(cols, -1)).max(-1).values


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of eq. 2: ``-beta * (log pi - log pi_ref)`` on every response action
    and the sequence reward ``scores[b]`` added on the last one.

    Shapes: scores ``[B]``, logps / ref_logps / mask ``[B, T-1]``. Returns (rewards ``[B, T-1]``,
    per-token KL estimate ``[B, T-1]``)."""
    kl = (logps - ref_logps) * mask
    rewards = -beta * kl
    last = last_action_index(mask)
    has = last >= 0
    rows = torch.arange(scores.shape[0], device=scores.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response actions of each row.

    ``delta_t = R_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    ``V_{t+1}`` and ``A_{t+1}`` are zero past the response's last action (episode end).
    Shapes ``[B, T-1]``; returns (advantages, returns = advantages + values), zero off the mask.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    adv = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
        # a non-response column (padding after, prompt before) breaks the chain
        next_adv = adv[:, t]
        next_value = values[:, t]
    return adv, (adv + values) * m


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate, mean over response actions: ``max(-A rho, -A clip(rho, 1-e, 1+e))``."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), mask)
    return loss, {"clipfrac": clipfrac.item(), "approx_kl": masked_mean(old_logps - logps, mask).item()}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_eps: float = 0.2) -> torch.Tensor:
    """``0.5 * max((V - G)^2, (V_old + clip(V - V_old, -e, e) - G)^2)``, mean over response actions."""
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def ptx_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of pretraining text (``-log pi(x)`` of eq. 2's gamma term, per token)."""
    device = modeling.device_of(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logps = encoding.gather_token_logprobs(logits, input_ids[:, 1:])
    return -masked_mean(logps, attention_mask[:, 1:].bool())


class ValueHead(nn.Module):
    """``V(s) = w . h_s + b`` on the policy's last hidden state; zero-initialised (V = 0 at start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
@dataclass
class PPOConfig:
    """PPO hyper-parameters (InstructGPT's beta lies in 0.01-0.02 at scale; the toy needs more)."""

    steps: int = 10  # rollout rounds
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    ppo_epochs: int = 2
    minibatches: int = 1
    beta: float = 0.05  # KL coefficient of eq. 2
    gamma: float = 1.0  # discount (not eq. 2's gamma)
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    ptx_coef: float = 0.0  # eq. 2's gamma: PPO-ptx when > 0
    whiten_advantages: bool = True
    lr: float = 1e-4
    value_lr: float | None = None  # default: 10x lr (the head starts at zero)
    max_grad_norm: float = 1.0
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=24))
    seed: int = 0
    checkpoint_every: int = 10  # steps between checkpoints (and one at the end) when a checkpoint_dir is given


def _ptx_batch(tokenizer: Any, texts: Sequence[str], n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(len(texts), (n,), generator=gen).tolist()
    enc = [list(tokenizer(texts[i], add_special_tokens=True)["input_ids"]) for i in idx]
    batch = encoding.make_token_batch([[]] * n, enc, tokenizer.pad_token_id or 0)
    return batch.input_ids, batch.attention_mask


def train_ppo(policy: nn.Module, tokenizer: Any, prompts: Sequence[Messages], make_generator: Any,
              reward_fn: Any, config: PPOConfig | None = None, ref: nn.Module | None = None,
              ptx_texts: Sequence[str] | None = None, eval_prompts: Sequence[Messages] | None = None,
              eval_sampling: SamplingParams | None = None, eval_reward_fn: Any = None,
              checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, ValueHead, OnlineReport]:
    """Train ``policy`` in place with PPO against ``reward_fn``; returns (policy, value head, report).

    ``make_generator(model, tokenizer)`` wraps the live policy for sampling (from the flow);
    ``ref`` defaults to a frozen copy of the starting policy; ``ptx_texts`` enables PPO-ptx.
    ``checkpoint_dir``: save policy, value head, optimizer, RNG states and the record every
    ``checkpoint_every`` steps and at the end; a call with the same folder, config and prompts
    (``policy`` = the same starting weights) resumes from the newest checkpoint.
    """
    eval_reward_fn = eval_reward_fn or reward_fn  # e.g. the verifier when training on a reward model
    cfg = config or PPOConfig()
    if cfg.ptx_coef > 0 and not ptx_texts:
        raise ValueError("ptx_coef > 0 needs ptx_texts (the pretraining data of eq. 2)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ref = ref if ref is not None else modeling.frozen_copy(policy)
    value_head = ValueHead(policy.config.hidden_size).to(modeling.device_of(policy))
    optimizer = torch.optim.AdamW([
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": value_head.parameters(), "lr": cfg.value_lr or 10 * cfg.lr},
    ])
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    run = runs.start_run("ppo", cfg, checkpoint_dir, make_generator, policy, tokenizer, prompts, eval_prompts,
                       eval_reward_fn, eval_sampling)
    prompts, eval_prompts, eval_sampling, spend, report = (run.prompts, run.eval_prompts, run.eval_sampling,
                                                           run.spend, run.report)
    device = modeling.device_of(policy)  # every rollout tensor lives where the policy does (after the
    modeling.colocate(ref, policy)       # generator factory has moved it); reference and head follow
    modeling.colocate(value_head, policy)
    state = {"policy": policy, "value_head": value_head, "optimizer": optimizer}  # checkpointed besides the RNG
    spend, start = runs.resume_into(run, state, gen)
    generator = make_generator(policy, tokenizer)
    for step in range(start, cfg.steps):
        idx = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        # --- rollout: sample, score, old log-probs, reference log-probs, values
        policy.eval()
        gens = ro.sample(generator, batch_prompts, cfg.samples_per_prompt, cfg.sampling, spend)
        flat_p = [p for p, g in zip(batch_prompts, gens) for _ in g]
        flat_g = [x for g in gens for x in g]
        scores = ro.score(reward_fn, flat_p, [g.text for g in flat_g], spend, device=device)
        batch = encoding.encode_samples(tokenizer, flat_p, [g.text for g in flat_g],
                                  ro.finished_flags(flat_g, cfg.sampling.max_new_tokens)).to(device)
        mask = batch.action_mask
        with torch.no_grad():
            old_logps, hidden = encoding.forward_token_logprobs(policy, batch, return_hidden=True)
            old_values = value_head(hidden) * mask
            ref_logps = encoding.forward_token_logprobs(ref, batch)[0].to(device)
            rewards, kl = kl_penalized_rewards(scores, old_logps, ref_logps, mask, cfg.beta)
            adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = masked_whiten(adv, mask)
        # --- optimisation: a few epochs over minibatches of this rollout
        policy.train()
        n = batch.input_ids.shape[0]
        stats: dict = {}
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=gen)
            for mb in perm.chunk(max(1, min(cfg.minibatches, n))):
                mb = mb.to(device)
                sub = encoding.TokenBatch(batch.input_ids[mb], batch.attention_mask[mb], mask[mb])
                logps, hidden = encoding.forward_token_logprobs(policy, sub, return_hidden=True)
                values = value_head(hidden)
                pg, stats = clipped_policy_loss(logps, old_logps[mb], adv[mb], sub.action_mask, cfg.clip_eps)
                vf = clipped_value_loss(values, old_values[mb], returns[mb], sub.action_mask, cfg.value_clip_eps)
                loss = pg + cfg.vf_coef * vf
                if cfg.ptx_coef > 0:
                    ids, am = _ptx_batch(tokenizer, ptx_texts, len(mb), gen)
                    loss = loss + cfg.ptx_coef * ptx_loss(policy, ids, am)
                modeling.step(optimizer, loss, all_params, cfg.max_grad_norm)
        report.history.append({
            "step": step, "reward": float(scores.mean()), "kl": float(kl.sum(-1).mean()),
            "policy_loss": pg.item(), "value_loss": vf.item(), **stats,
        })
        runs.save_progress(checkpoint_dir, step + 1, cfg.steps, cfg.checkpoint_every, state, gen, run.fingerprint,
                         report, spend, run.first)
    policy.eval()
    final = ro.evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling, ref=ref)
    runs.finish_run(report, final, spend, t0)
    return policy, value_head, report
