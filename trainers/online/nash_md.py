"""Nash-MD (survey eq. 57-59): mirror descent towards the Nash equilibrium of a preference game.

The opponent is the geometric mixture of the current policy and the reference (eq. 58)::

    pi_mix(y|x)  propto  pi^t(y|x)^(1 - a*beta) * pi_ref(y|x)^(a*beta)

sampled TOKEN BY TOKEN (the Nash-MD paper's tractable approximation): at every step the next
token is drawn from ``softmax((1 - m) * log pi^t(.|s) + m * log pi_ref(.|s))`` with ``m = a*beta``
(``mixture_logits``), both models advanced with their own KV cache (``sample_mixture``).

The update (eq. 59) maximises ``a * P(pi > pi_mix) - KL(pi || pi_mix)``; as in the Nash-MD
paper's policy-gradient form, each step samples y ~ pi^t and y' ~ pi_mix for a prompt, asks the
preference model for P(y > y'|x), and ascends ``(P(y > y'|x) - 1/2) grad log pi(y|x)`` minus
``beta`` times the KL(pi || pi_ref) estimate ``log pi(y|x) - log pi_ref(y|x)`` (eq. 57's
regulariser), a REINFORCE estimator with the 1/2 baseline of a symmetric game.
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
from alignflow.trainers.logprobs import response_logps
from alignflow.trainers.online import rollout as ro
from alignflow.trainers.online import runs


def mixture_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mix: float) -> torch.Tensor:
    """Per-token geometric mixture (eq. 58): normalised ``(1-mix) log pi + mix log pi_ref``; ``[..., V]``."""
    lp = torch.log_softmax(policy_logits.float(), -1)
    lr = torch.log_softmax(ref_logits.float(), -1)
    return torch.log_softmax((1.0 - mix) * lp + mix * lr, -1)


@torch.no_grad()
def sample_mixture(policy: nn.Module, ref: nn.Module, tokenizer: Any, prompts: Sequence[Messages],
                   mix: float, max_new_tokens: int = 24, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> list[str]:
    """One response per prompt from pi_mix, token by token (left-padded batch, two KV caches).

    The batch lives on the policy's device (``ref`` must be there too). A ``generator`` on
    another device than the models (the trainers' CPU generator, a CUDA policy) draws from the
    mixture's probabilities copied to its device; on CPU nothing is copied."""
    from transformers import DynamicCache

    device = modeling.device_of(policy)
    seqs = [encoding.encode_prompt(tokenizer, p) for p in prompts]
    ids, mask, pos = (t.to(device) for t in encoding.left_padded(seqs, tokenizer.pad_token_id))
    cache_kws = [encoding.cache_kwarg(m) for m in (policy, ref)]  # "cache" on transformers 5.2x
    outs = [m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: DynamicCache()})
            for m, kw in zip((policy, ref), cache_kws)]
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(len(seqs), dtype=torch.bool, device=device)
    tokens: list[list[int]] = [[] for _ in seqs]
    for _ in range(max_new_tokens):
        logits = mixture_logits(outs[0].logits[:, -1], outs[1].logits[:, -1], mix) / max(temperature, 1e-6)
        probs = torch.softmax(logits, -1)
        if generator is not None and probs.device != generator.device:
            probs = probs.cpu()  # a generator draws on its own device
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
        for i, (t, finished) in enumerate(zip(tok.tolist(), done.tolist())):  # one host copy per step
            if not finished:
                tokens[i].append(t)
        done |= tok == tokenizer.eos_token_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=mask.dtype, device=device)], -1)
        outs = [m(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                  **{kw: encoding.cache_of(o)}) for m, o, kw in zip((policy, ref), outs, cache_kws)]
        next_pos = next_pos + 1
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


@dataclass
class NashMDConfig:
    steps: int = 10
    prompts_per_step: int = 16
    mixture: float = 0.25  # a_t * beta of eq. 58 (0: opponent = pi^t, 1: opponent = pi_ref)
    beta: float = 0.05  # KL-to-reference weight of eq. 57
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=24))
    seed: int = 0
    checkpoint_every: int = 10  # steps between checkpoints (and one at the end) when a checkpoint_dir is given


def train_nash_md(policy: nn.Module, tokenizer: Any, prompts: Sequence[Any], make_generator: Any,
                  preference_fn: Any, config: NashMDConfig | None = None, ref: nn.Module | None = None,
                  eval_prompts: Sequence[Any] | None = None, eval_reward_fn: Any = None,
                  eval_sampling: SamplingParams | None = None,
                  checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, OnlineReport]:
    """Train ``policy`` in place with Nash-MD against ``preference_fn`` (P(a > b|x), debiased).

    ``checkpoint_dir``: save policy, optimizer, RNG states, step, record and spend every
    ``checkpoint_every`` steps and at the end (``step-00000t/``); a call with the same folder,
    config (``steps`` may grow) and prompts, given the same starting policy, resumes from the
    newest checkpoint. The reference is the starting policy, so it is never stored."""
    cfg = config or NashMDConfig()
    if eval_reward_fn is None:
        raise ValueError("train_nash_md needs eval_reward_fn to report progress")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ref = ref if ref is not None else modeling.frozen_copy(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    run = runs.start_run("nash-md", cfg, checkpoint_dir, make_generator, policy, tokenizer, prompts, eval_prompts,
                       eval_reward_fn, eval_sampling)
    prompts, eval_prompts, eval_sampling, spend, report = (run.prompts, run.eval_prompts, run.eval_sampling,
                                                           run.spend, run.report)
    state = {"policy": policy, "optimizer": optimizer}  # what a checkpoint holds besides the random streams
    spend, start = runs.resume_into(run, state, gen)
    generator = make_generator(policy, tokenizer)
    modeling.colocate(ref, policy)  # the generator factory may have moved the policy; the mixture needs both
    for step in range(start, cfg.steps):
        idx = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=gen).tolist()
        batch_prompts = [prompts[i] for i in idx]
        policy.eval()
        gens = [g[0] for g in ro.sample(generator, batch_prompts, 1, cfg.sampling, spend)]
        ys = [g.text for g in gens]
        # a sample cut at the token budget never emitted eos: scored without one
        finished = [[f] for f in ro.finished_flags(gens, cfg.sampling.max_new_tokens)]
        y_mix = sample_mixture(policy, ref, tokenizer, batch_prompts, cfg.mixture,
                               cfg.sampling.max_new_tokens, cfg.sampling.temperature, gen)
        spend.add(generations=len(y_mix))
        pref = torch.tensor([float(p) for p in preference_fn(batch_prompts, ys, y_mix)], device=modeling.device_of(policy))
        spend.add(judge_calls=len(ys))
        policy.train()
        logps, _ = response_logps(policy, tokenizer, batch_prompts, [[y] for y in ys], finished)
        with torch.no_grad():
            ref_logps, _ = response_logps(ref, tokenizer, batch_prompts, [[y] for y in ys], finished)
            kl = (logps.detach() - ref_logps.to(logps.device))[:, 0]
            advantage = (pref - 0.5) - cfg.beta * kl
        loss = -(advantage * logps[:, 0]).mean()
        modeling.step(optimizer, loss, params, cfg.max_grad_norm)
        report.history.append({"step": step, "preference_vs_mixture": float(pref.mean()), "kl": float(kl.mean())})
        runs.save_progress(checkpoint_dir, step + 1, cfg.steps, cfg.checkpoint_every, state, gen, run.fingerprint,
                         report, spend, run.first)
    policy.eval()
    final = ro.evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling, ref=ref)
    runs.finish_run(report, final, spend, t0)
    return policy, report
