"""PAFT (survey 3.7.2, eq. 43): SFT and DPO trained in PARALLEL as LoRA adapters, then merged.

Both adapters start from the same pretrained/SFT weights pi_pre (never one after the other, so
neither forgets the other's gains):

- adapter ``sft``: mean per-token NLL of the good responses plus an L1 penalty
  ``l1 * sum |dW_sft|`` on its weight delta ``dW = scaling * B @ A`` of every LoRA module (the
  survey: SFT + l1 norm makes the SFT delta sparse like DPO's, which the paper found essential
  for merging). The penalty is on dW, not on the factors A and B: a sparse pair of factors does
  not make their product sparse, nor the reverse;
- adapter ``dpo``: the ``dpo`` loss with pi_pre (adapters disabled) as the reference.

Steps alternate between the two adapters (each with its own optimizer). The merge (eq. 43)
``pi_merge = f(pi_pre, delta_dpo, delta_sft)`` is peft's ``add_weighted_adapter`` (``cat``:
exactly ``W_pre + w_sft*dW_sft + w_dpo*dW_dpo``; ``ties`` / ``dare_ties`` for sparse merging),
folded into the base weights with ``merge_and_unload``.

The online driver ``train_paft`` builds both data sets from on-policy samples judged by the
reward function: SFT examples = each prompt's best sample, DPO pairs = best vs worst.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alignflow.schemas.generator import SamplingParams
from alignflow.schemas.online import OnlineReport
from alignflow.trainers import modeling
from alignflow.trainers.logprobs import response_logps
from alignflow.trainers.losses import compute_loss
from alignflow.trainers.online import rollout as ro
from alignflow.trainers.online import runs
from alignflow.trainers.online.iterative import IterativeConfig, Pair, build_pairs

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PAFTConfig:
    rounds: int = 1
    prompts_per_round: int = 32
    k: int = 4
    epochs: int = 3
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.1
    l1: float = 1e-5  # L1 weight on the SFT adapter's weight delta dW = scaling * B @ A
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    weights: tuple[float, float] = (1.0, 1.0)  # (sft, dpo) merge weights
    combination: str = "cat"
    density: float = 0.5  # for ties / dare merges
    max_grad_norm: float = 1.0
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=24))
    seed: int = 0


def add_paft_adapters(model: nn.Module, cfg: PAFTConfig) -> nn.Module:
    """Wrap ``model`` with two LoRA adapters, ``sft`` and ``dpo`` (peft)."""
    from peft import LoraConfig, get_peft_model

    def lora() -> LoraConfig:
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")

    peft_model = get_peft_model(model, lora(), adapter_name="sft")
    peft_model.add_adapter("dpo", lora())
    return peft_model


def adapter_params(peft_model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if f".{name}." in n and "lora_" in n]


def _abs_sum_of_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (b @ a).abs().sum()


def lora_deltas(peft_model: nn.Module, name: str) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, float]]:
    """(module, A, B, scaling) of every LoRA module of adapter ``name``: ``dW = scaling * B @ A``."""
    return [(m, m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name]))
            for m in peft_model.modules() if hasattr(m, "lora_A") and name in m.lora_A]


def l1_penalty(peft_model: nn.Module, name: str) -> torch.Tensor:
    """``sum over LoRA modules of |scaling * B @ A|_1``: the L1 norm of adapter ``name``'s weight
    delta. Each dW is recomputed in the backward pass (activation checkpointing), so at most one
    module's dW is in memory at a time, whatever the model's size."""
    from torch.utils.checkpoint import checkpoint

    terms = [scaling * checkpoint(_abs_sum_of_product, b, a, use_reentrant=False)
             for _, a, b, scaling in lora_deltas(peft_model, name)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def _near_zero_share(peft_model: nn.Module, name: str, rel: float = 1e-3) -> float:
    """Share of the entries of adapter ``name``'s deltas dW below ``rel`` times that module's
    largest entry (how sparse the delta that gets merged is)."""
    small = total = 0
    for _, a, b, scaling in lora_deltas(peft_model, name):
        d = (scaling * (b @ a)).abs()
        small += int((d <= rel * d.max()).sum()) if d.max() > 0 else d.numel()
        total += d.numel()
    return small / max(1, total)


def merge_adapters(peft_model: nn.Module, cfg: PAFTConfig) -> nn.Module:
    """Eq. 43: one set of weights from pi_pre + the weighted SFT and DPO deltas."""
    kwargs = {}
    if cfg.combination in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        kwargs["density"] = cfg.density
    peft_model.add_weighted_adapter(["sft", "dpo"], list(cfg.weights), adapter_name="merged",
                                    combination_type=cfg.combination, **kwargs)
    peft_model.set_adapter("merged")
    return peft_model.merge_and_unload()


def _sft_loss(model: nn.Module, tokenizer: Any, prompts: Sequence[Any], responses: Sequence[str],
              finished: Sequence[bool] | None = None) -> torch.Tensor:
    finished = [[f] for f in finished] if finished is not None else None
    logps, tokens = response_logps(model, tokenizer, prompts, [[r] for r in responses], finished)
    return compute_loss("sft", {"chosen_logps": logps[:, 0], "chosen_tokens": tokens[:, 0]}).mean()


def train_paft_adapters(model: nn.Module, tokenizer: Any, sft_examples: Sequence[tuple],
                        pairs: Sequence[Pair], cfg: PAFTConfig) -> tuple[nn.Module, dict]:
    """Train the two adapters in parallel (alternating steps) and merge them; returns the
    merged plain model and losses. ``sft_examples``: (prompt, response) or (prompt, response,
    finished) tuples; an unfinished response is learnt without eos."""
    peft_model = add_paft_adapters(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad(), peft_model.disable_adapter():
        ref_logps = response_logps(peft_model, tokenizer, [p.prompt for p in pairs],
                                   [[p.chosen, p.rejected] for p in pairs],
                                   [[p.chosen_finished, p.rejected_finished] for p in pairs])[0] if pairs else None
    opts = {}
    for name in ("sft", "dpo"):
        peft_model.set_adapter(name)
        opts[name] = torch.optim.AdamW(adapter_params(peft_model, name), lr=cfg.lr)
    hist = {"sft": [], "dpo": []}
    n_steps = cfg.epochs * max(1, -(-max(len(sft_examples), len(pairs)) // cfg.batch_size))
    for _ in range(n_steps):
        # --- SFT adapter step: NLL of good responses + L1 sparsity
        if sft_examples:
            peft_model.set_adapter("sft")
            params = adapter_params(peft_model, "sft")
            idx = torch.randint(len(sft_examples), (min(cfg.batch_size, len(sft_examples)),), generator=gen).tolist()
            ex = [sft_examples[i] for i in idx]
            loss = _sft_loss(peft_model, tokenizer, [e[0] for e in ex], [e[1] for e in ex],
                             [e[2] if len(e) > 2 else True for e in ex])
            if cfg.l1 > 0:
                loss = loss + cfg.l1 * l1_penalty(peft_model, "sft")
            modeling.step(opts["sft"], loss, params, cfg.max_grad_norm)
            hist["sft"].append(loss.item())
        # --- DPO adapter step against pi_pre
        if pairs:
            peft_model.set_adapter("dpo")
            params = adapter_params(peft_model, "dpo")
            idx = torch.randint(len(pairs), (min(cfg.batch_size, len(pairs)),), generator=gen)
            sel = [pairs[i] for i in idx.tolist()]
            logps, tokens = response_logps(peft_model, tokenizer, [p.prompt for p in sel],
                                           [[p.chosen, p.rejected] for p in sel],
                                           [[p.chosen_finished, p.rejected_finished] for p in sel])
            ref_sel = ref_logps[idx.to(ref_logps.device)].to(logps.device)
            batch = {"chosen_logps": logps[:, 0], "rejected_logps": logps[:, 1],
                     "ref_chosen_logps": ref_sel[:, 0], "ref_rejected_logps": ref_sel[:, 1],
                     "chosen_tokens": tokens[:, 0], "rejected_tokens": tokens[:, 1]}
            loss = compute_loss("dpo", batch, beta=cfg.beta).mean()
            modeling.step(opts["dpo"], loss, params, cfg.max_grad_norm)
            hist["dpo"].append(loss.item())
    sparsity = {name: _near_zero_share(peft_model, name) for name in ("sft", "dpo")}
    merged = merge_adapters(peft_model, cfg)
    merged.eval()
    return merged, {"sft_loss": hist["sft"][-1:] or None, "dpo_loss": hist["dpo"][-1:] or None,
                    "near_zero_share": sparsity}


def train_paft(policy: nn.Module, tokenizer: Any, prompts: Sequence[Any], make_generator: Any,
               reward_fn: Any, config: PAFTConfig | None = None, eval_prompts: Sequence[Any] | None = None,
               eval_sampling: SamplingParams | None = None, eval_reward_fn: Any = None,
               checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, OnlineReport]:
    """On-policy PAFT: sample K, judge, build SFT and DPO data, train both adapters in
    parallel, merge; repeated ``rounds`` times. Returns (merged model, report).

    ``checkpoint_dir``: every finished round is saved there atomically (``round-00000t/``: the
    merged policy's weights, the RNG states, the record and the spend; the adapters and their
    optimizers are fresh every round, so nothing else is needed). A call with the same folder,
    config (``rounds`` may grow) and prompts, given the same starting policy, skips the
    finished rounds and continues."""
    eval_reward_fn = eval_reward_fn or reward_fn  # e.g. the verifier when training on a reward model
    cfg = config or PAFTConfig()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # sampling seeds and LoRA initialisations: a run is reproducible
    gen = torch.Generator().manual_seed(cfg.seed)
    sft_ref = modeling.frozen_copy(policy)
    run = runs.start_run("paft", cfg, checkpoint_dir, make_generator, policy, tokenizer, prompts, eval_prompts,
                       eval_reward_fn, eval_sampling)
    prompts, eval_prompts, eval_sampling, spend, report = (run.prompts, run.eval_prompts, run.eval_sampling,
                                                           run.spend, run.report)
    modeling.colocate(sft_ref, policy)  # the generator factory may have moved the policy
    # resume after the newest finished round: the merged weights and the random streams
    spend, start = runs.resume_into(run, {"policy": policy}, gen)
    pair_cfg = IterativeConfig(method="iterative-dpo", k=cfg.k)
    for r in range(start, cfg.rounds):
        idx = torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_round].tolist()
        round_prompts = [prompts[i] for i in idx]
        policy.eval()
        gens = ro.sample(make_generator(policy, tokenizer), round_prompts, cfg.k, cfg.sampling, spend)
        pairs = build_pairs(pair_cfg, round_prompts, [[g.text for g in gs] for gs in gens], reward_fn, spend=spend,
                            finished=[ro.finished_flags(gs, cfg.sampling.max_new_tokens) for gs in gens])
        # (prompt, response, finished): a chosen answer that was cut off is learnt without eos
        sft_examples = [(p.prompt, p.chosen, p.chosen_finished) for p in pairs]
        policy, stats = train_paft_adapters(policy, tokenizer, sft_examples, pairs, cfg)
        report.history.append({"round": r + 1, "pairs": len(pairs), **stats})
        runs.save_progress(checkpoint_dir, r + 1, cfg.rounds, 1, {"policy": policy}, gen, run.fingerprint, report, spend,
                         run.first, prefix="round")
    final = ro.evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling, ref=sft_ref)
    runs.finish_run(report, final, spend, t0)
    return policy, report
