"""Generate-judge-train rounds: iterative DPO, self-rewarding, pairwise CRINGE, SPPO, DNO.

One round t (survey 3.1.3, 3.5, 3.11):

1. sample responses to this round's prompts from the current policy pi^t (and an enhancer:
   a hotter temperature, or rejection sampling = K samples ranked by the oracle);
2. judge them and build pairs (method below);
3. train a few epochs with the method's loss, the reference being pi^t (refreshed every round;
   ``refresh_reference=False`` keeps the SFT reference);
4. evaluate on held-out prompts and apply the termination rule (``termination.py``): stop
   when iteration t does not beat t-1 significantly (binomial test, position-debiased judge
   or reward comparisons) or the held-out reward stops rising.

| method | oracle | pair / target | loss |
| --- | --- | --- | --- |
| ``iterative-dpo`` | reward_fn | best vs worst of K (rejection) or main vs enhancer (temperature, below) | ``dpo`` |
| ``self-rewarding`` | judge_factory(pi^t): the model's own rubric scores (3.5.1) | best vs worst of K | ``dpo`` |
| ``cringe`` | reward_fn, K = 4 (3.5.2) | best vs worst | ``cringe`` (pairwise, eq. 30) |
| ``sppo`` | preference_fn, win-rates P(y_i > pi^t) = mean_j P(y_i > y_j) (eq. 60-61) | best vs worst + win-rates | ``sppo`` |
| ``dno`` | preference_fn over K samples + the gold response, win-rate ranking (eq. 62) | top vs bottom if the win-rate gap >= ``dno_margin`` | ``dpo`` vs pi^t |

The enhancer (survey 3.1.3): ``rejection`` samples K from the main policy and pairs the best with
the worst; ``temperature`` samples K/2 from the main policy and K/2 from the enhancer (the main
policy at ``enhancer_temperature``) and, for the reward-judged methods (iterative-dpo,
self-rewarding, cringe), pairs main sample j with enhancer sample j, the oracle deciding which is
chosen (K/2 pairs per prompt, ties dropped). SPPO and DNO rank all K by win-rate as usual.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alignflow.schemas.generator import Messages, SamplingParams
from alignflow.schemas.online import OnlineReport
from alignflow.trainers import encoding, modeling
from alignflow.trainers.logprobs import response_logps
from alignflow.trainers.losses import compute_loss, cringe_topk_excluding
from alignflow.trainers.online import checkpointing as ck
from alignflow.trainers.online import rollout as ro
from alignflow.trainers.online import runs
from alignflow.trainers.online.termination import count_outcomes, should_stop, winrate_test

METHODS = ("iterative-dpo", "self-rewarding", "cringe", "sppo", "dno")


@dataclass
class IterativeConfig:
    method: str = "iterative-dpo"
    rounds: int = 3
    prompts_per_round: int = 32
    k: int = 4
    enhancer: str = "rejection"  # or "temperature": main vs enhancer pairs (module docstring)
    enhancer_temperature: float = 1.5
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    beta: float = 0.1
    loss_params: dict = field(default_factory=dict)  # extra loss parameters (e.g. cringe alpha, k)
    refresh_reference: bool = True
    dno_margin: float = 0.25  # DNO's large-margin filter on the win-rate gap
    terminate: bool = True  # apply the termination rule between rounds
    alpha: float = 0.05  # level of the binomial test
    min_reward_delta: float = 0.0
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=24))
    layout: str = "packed"
    seed: int = 0


@dataclass
class Pair:
    prompt: Messages
    chosen: str
    rejected: str
    chosen_winrate: float = 1.0
    rejected_winrate: float = 0.0
    # a sample cut off at max_new_tokens is trained without eos (it did not choose to stop)
    chosen_finished: bool = True
    rejected_finished: bool = True


# --------------------------------------------------------------------------------------------
# Pair construction
# --------------------------------------------------------------------------------------------
def best_worst(scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest score (first on ties); None if all are equal."""
    hi = max(range(len(scores)), key=lambda i: scores[i])
    lo = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[hi] == scores[lo] else (hi, lo)


def winrate_matrix(preference_fn: Any, prompt: Messages, responses: Sequence[str],
                   spend: ro.Spend | None = None) -> torch.Tensor:
    """``P[i, j] = P(y_i > y_j | x)`` for all pairs, from C(K,2) debiased judgements (the
    other half is ``1 - P``); the diagonal is 1/2. ``[K, K]``."""
    k = len(responses)
    idx = [(i, j) for i in range(k) for j in range(i + 1, k)]
    probs = preference_fn([prompt] * len(idx), [responses[i] for i, _ in idx], [responses[j] for _, j in idx])
    if spend is not None:
        spend.add(judge_calls=len(idx))
    mat = torch.full((k, k), 0.5)
    for (i, j), p in zip(idx, probs):
        mat[i, j], mat[j, i] = float(p), 1.0 - float(p)
    return mat


def winrates(mat: torch.Tensor) -> torch.Tensor:
    """``P(y_i > pi^t | x)`` estimated as the mean over the other K-1 samples (eq. 61's sum / K)."""
    k = mat.shape[0]
    return (mat.sum(1) - mat.diagonal()) / (k - 1)


def build_pairs(cfg: IterativeConfig, prompts: Sequence[Messages], samples: Sequence[Sequence[str]],
                reward_fn: Any = None, preference_fn: Any = None, gold: dict | None = None,
                spend: ro.Spend | None = None, finished: Sequence[Sequence[bool]] | None = None) -> list[Pair]:
    """The round's training pairs for ``cfg.method`` (see the module table).

    ``finished[i][j]``: sample j of prompt i ended by itself (default: all did). With the
    temperature enhancer, ``samples[i]`` holds the main samples then as many enhancer samples
    (what ``_sample_round`` returns)."""
    finished = finished or [[True] * len(s) for s in samples]
    pairs: list[Pair] = []
    if cfg.method in ("iterative-dpo", "self-rewarding", "cringe"):
        flat_p = [p for p, s in zip(prompts, samples) for _ in s]
        flat = ro.score(reward_fn, flat_p, [x for s in samples for x in s], spend).tolist()
        pos = 0
        for p, s, fin in zip(prompts, samples, finished):
            sc = flat[pos:pos + len(s)]
            pos += len(s)
            if cfg.enhancer == "temperature":  # main sample j against enhancer sample j
                half = len(s) // 2
                for a, b in ((j, half + j) for j in range(half)):
                    if sc[a] != sc[b] and s[a] != s[b]:
                        hi, lo = (a, b) if sc[a] > sc[b] else (b, a)
                        pairs.append(Pair(p, s[hi], s[lo], chosen_finished=fin[hi], rejected_finished=fin[lo]))
                continue
            bw = best_worst(sc)
            if bw is not None and s[bw[0]] != s[bw[1]]:
                pairs.append(Pair(p, s[bw[0]], s[bw[1]], chosen_finished=fin[bw[0]], rejected_finished=fin[bw[1]]))
        return pairs
    if cfg.method == "sppo":
        for p, s, fin in zip(prompts, samples, finished):
            w = winrates(winrate_matrix(preference_fn, p, s, spend))
            bw = best_worst(w.tolist())
            if bw is not None and s[bw[0]] != s[bw[1]]:
                pairs.append(Pair(p, s[bw[0]], s[bw[1]], float(w[bw[0]]), float(w[bw[1]]), fin[bw[0]], fin[bw[1]]))
        return pairs
    if cfg.method == "dno":
        for p, s, fin in zip(prompts, samples, finished):
            key = encoding.prompt_text_of(p)
            cands = list(s) + ([gold[key]] if gold and key in gold else [])
            done = list(fin) + [True] * (len(cands) - len(s))  # a gold response is complete
            w = winrates(winrate_matrix(preference_fn, p, cands, spend))
            bw = best_worst(w.tolist())
            if bw is not None and float(w[bw[0]] - w[bw[1]]) >= cfg.dno_margin and cands[bw[0]] != cands[bw[1]]:
                pairs.append(Pair(p, cands[bw[0]], cands[bw[1]], float(w[bw[0]]), float(w[bw[1]]), done[bw[0]], done[bw[1]]))
        return pairs
    raise ValueError(f"unknown iterative method {cfg.method!r}; known: {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------
# One training epoch over pairs
# --------------------------------------------------------------------------------------------
def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


CRINGE_NEGATIVES = ("all", "after_divergence", "first_divergence", "diff")


def unshared_positions(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> list[bool]:
    """Per token of the rejected answer: True where it is NOT part of a longest-matching-block
    alignment with the chosen answer (``difflib``; the tokens only the rejected answer has)."""
    import difflib

    out = [True] * len(rejected_ids)
    for blk in difflib.SequenceMatcher(None, list(chosen_ids), list(rejected_ids), autojunk=False).get_matching_blocks():
        out[blk.b:blk.b + blk.size] = [False] * blk.size
    return out


def cringe_negative_flags(chosen_ids: Sequence[int], rejected_ids: Sequence[int], negatives: str = "all",
                          eos_id: int | None = None) -> list[bool]:
    """Which tokens of the rejected answer ``rejected_ids`` are contrasted as negatives (eq. 29's
    y_t-), one flag per token; ``chosen_ids`` is the chosen answer of the same pair.

    ``negatives``: ``"all"`` every token (eq. 29 as the survey writes it); ``"after_divergence"``
    from the first token that departs from the chosen answer to the end; ``"first_divergence"``
    only that token (eos excluded); ``"diff"`` the tokens outside a longest-matching-block
    alignment with the chosen answer (``unshared_positions``). Why restrict: tokens the two
    answers share are trained UP by the positive term; contrasting them too pushes the same
    token both ways, and the contrast wins (see ``cringe_pair_loss``).
    """
    if negatives not in CRINGE_NEGATIVES:
        raise ValueError(f"cringe negatives must be one of {CRINGE_NEGATIVES}, not {negatives!r}")
    n = len(rejected_ids)
    if negatives == "all":
        return [True] * n
    if negatives == "diff":
        return unshared_positions(chosen_ids, rejected_ids)
    shared = common_prefix_len(chosen_ids, rejected_ids)
    if negatives == "after_divergence":
        return [i >= shared for i in range(n)]
    return [i == shared and rejected_ids[i] != eos_id for i in range(n)]


def _cringe_rejected_tensors(policy: nn.Module, tokenizer: Any, pairs: Sequence[Pair], k: int,
                             negatives: str = "all") -> dict:
    """Top-k logits (negative token excluded) and the negative token's logit over the rejected
    responses' tokens, the extra tensors the pairwise ``cringe`` loss reads; the mask holds the
    negatives chosen by ``cringe_negative_flags``."""
    batch = encoding.encode_samples(tokenizer, [x.prompt for x in pairs], [x.rejected for x in pairs],
                              [x.rejected_finished for x in pairs]).to(modeling.device_of(policy))
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
    topk, tok = cringe_topk_excluding(logits.float(), batch.actions, k)
    mask = batch.action_mask.clone()
    if negatives != "all":
        for i, x in enumerate(pairs):
            flags = cringe_negative_flags(encoding.encode_response(tokenizer, x.chosen, x.chosen_finished),
                                          encoding.encode_response(tokenizer, x.rejected, x.rejected_finished),
                                          negatives, tokenizer.eos_token_id)
            cols = batch.action_mask[i].nonzero().flatten()  # the response's tokens, in order
            mask[i, cols] = torch.tensor(flags, dtype=torch.bool, device=mask.device)
    return {"rejected_topk_logits": topk, "rejected_token_logits": tok, "rejected_token_mask": mask}


# Defaults of iterative pairwise CRINGE (the survey and DESIGN.md give no b, tau; alpha and the
# negative tokens are measured choices, see cringe_pair_loss).
CRINGE_DEFAULTS = {"alpha": 0.03, "k": 5, "b": 100.0, "tau": 10.0, "negatives": "first_divergence"}


def cringe_pair_loss(policy: nn.Module, tokenizer: Any, pairs: Sequence[Pair], logps: torch.Tensor,
                     tokens: torch.Tensor, alpha: float = CRINGE_DEFAULTS["alpha"], k: int = CRINGE_DEFAULTS["k"],
                     b: float = CRINGE_DEFAULTS["b"], tau: float = CRINGE_DEFAULTS["tau"],
                     negatives: str = CRINGE_DEFAULTS["negatives"], gate_grad: bool = False,
                     from_divergence: bool | None = None) -> torch.Tensor:
    """Pairwise CRINGE (eq. 30): ``g * L_bin`` with ``L_bin`` the binary loss of eq. 29 on the
    pair (``-a_w`` on the chosen response + ``alpha`` * mean token contrast on the rejected
    one), both from the registry's ``cringe`` (binary form), and the gate
    ``g = sigmoid((b - (log pi(y_w) - log pi(y_l))) / tau)`` on summed log-probs.

    logps, tokens: ``[B, 2]`` summed log-probs and token counts of (chosen, rejected).
    ``negatives``: which rejected tokens are contrasted (``cringe_negative_flags``).
    ``gate_grad=False`` uses the gate as a weight without gradient; ``True`` is the registry's
    pairwise form (its gradient adds a reference-free ranking term).
    ``from_divergence=True`` is the older spelling of ``negatives="first_divergence"``.

    Defaults (measured on the toy world, 3 rounds, 64 held-out prompts; the first set fell
    0.60 -> 0.18):
    - ``b=100, tau=10`` (were 0, 1): sequence log-prob gaps of sampled pairs are tens of nats,
      so b=0, tau=1 made the gate a 0/1 switch that was open on the few pairs whose REJECTED
      answer is short (a short answer is likely), 4 of 32; under Adam that small set still
      gets full-size steps, and even the positive term alone (alpha=0) then lowered the reward
      (0.60 -> 0.53) while the same term ungated raised it (0.60 -> 0.69). b is the margin in
      nats past which a pair the policy already separates stops counting.
    - ``negatives="first_divergence"`` (was every token): half the rejected answer's tokens are
      the policy's own top choice (correct characters); the contrast's gradient is largest on
      exactly those (sigmoid(s_neg - s*) ~ 1) and lifts the top-k alternatives, so entropy
      rose everywhere and the reward collapsed at any alpha >= 0.1 even ungated. Only the
      first departing token keeps the negative signal where the pair actually differs.
    - ``alpha=0.03`` (was 1): even on the first departing token the contrast's gradient is
      dominated by the negatives the policy is sure of, and in self-generated near-miss pairs
      those are often right (16% of first departing tokens are the policy's top choice; the
      chosen answer has errors too); it lifts the top-k alternatives and entropy rises. With
      alpha 0.3 the reward fell on 2 of 3 seeds; 0.1 rose on 4 of 5 but not at 16 new tokens
      and lr 5e-4; 0.03 rose in every setting tried. NOT shown: that the negative term adds to
      the gain; alpha=0 (gated SFT on the best of K) rose as much or more in every setting.
    """
    if from_divergence is not None:
        negatives = "first_divergence" if from_divergence else "all"
    if gate_grad:
        batch = {"chosen_logps": logps[:, 0], "rejected_logps": logps[:, 1], "chosen_tokens": tokens[:, 0]}
        batch.update(_cringe_rejected_tensors(policy, tokenizer, pairs, k, negatives))
        return compute_loss("cringe", batch, alpha=alpha, k=k, b=b, tau=tau).mean()
    neg = _cringe_rejected_tensors(policy, tokenizer, pairs, k, negatives)
    n = len(pairs)
    binary = {
        "logps": torch.cat([logps[:, 0], logps[:, 1]]), "tokens": torch.cat([tokens[:, 0], tokens[:, 1]]),
        "label": torch.cat([torch.ones(n, dtype=torch.bool, device=logps.device),
                            torch.zeros(n, dtype=torch.bool, device=logps.device)]),
        # token tensors: rows of the chosen half are unused (label True), so they repeat the negatives
        "topk_logits": torch.cat([neg["rejected_topk_logits"]] * 2),
        "token_logits": torch.cat([neg["rejected_token_logits"]] * 2),
        "token_mask": torch.cat([torch.zeros_like(neg["rejected_token_mask"]), neg["rejected_token_mask"]]),
    }
    per_row = compute_loss("cringe", binary, alpha=alpha, k=k)
    l_bin = per_row[:n] + per_row[n:]
    gate = torch.sigmoid((b - (logps[:, 0] - logps[:, 1])) / tau).detach()
    return (gate * l_bin).mean()


def _finished(pairs: Sequence[Pair]) -> list[list[bool]]:
    return [[x.chosen_finished, x.rejected_finished] for x in pairs]


def pair_loss(cfg: IterativeConfig, policy: nn.Module, tokenizer: Any, pairs: Sequence[Pair],
              ref_logps: torch.Tensor) -> torch.Tensor:
    """Mean loss of the method over a minibatch of pairs; ``ref_logps`` ``[B, 2]`` (chosen, rejected)."""
    logps, tokens = response_logps(policy, tokenizer, [x.prompt for x in pairs],
                                   [[x.chosen, x.rejected] for x in pairs], _finished(pairs), layout=cfg.layout)
    ref_logps = ref_logps.to(logps.device)
    batch = {"chosen_logps": logps[:, 0], "rejected_logps": logps[:, 1],
             "ref_chosen_logps": ref_logps[:, 0], "ref_rejected_logps": ref_logps[:, 1],
             "chosen_tokens": tokens[:, 0], "rejected_tokens": tokens[:, 1]}
    params = dict(cfg.loss_params)
    if cfg.method == "cringe":
        return cringe_pair_loss(policy, tokenizer, pairs, logps, tokens, **params)
    if cfg.method == "sppo":
        batch["chosen_winrate"] = torch.tensor([x.chosen_winrate for x in pairs], dtype=logps.dtype,
                                               device=logps.device)
        batch["rejected_winrate"] = torch.tensor([x.rejected_winrate for x in pairs], dtype=logps.dtype,
                                                 device=logps.device)
        return compute_loss("sppo", batch, beta=cfg.beta, **params).mean()
    return compute_loss("dpo", batch, beta=cfg.beta, **params).mean()


def train_on_pairs(cfg: IterativeConfig, policy: nn.Module, ref: nn.Module, tokenizer: Any,
                   pairs: Sequence[Pair], optimizer: torch.optim.Optimizer, gen: torch.Generator) -> list[float]:
    """``cfg.epochs`` passes over the pairs; reference log-probs computed once up front."""
    with torch.no_grad():
        ref_logps = torch.cat([
            response_logps(ref, tokenizer, [x.prompt for x in pairs[s:s + 64]],
                           [[x.chosen, x.rejected] for x in pairs[s:s + 64]], _finished(pairs[s:s + 64]),
                           layout=cfg.layout)[0]
            for s in range(0, len(pairs), 64)])
    params = [p for p in policy.parameters() if p.requires_grad]
    losses = []
    policy.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(pairs), generator=gen)
        for chunk in order.split(cfg.batch_size):
            loss = pair_loss(cfg, policy, tokenizer, [pairs[i] for i in chunk.tolist()],
                             ref_logps[chunk.to(ref_logps.device)])
            modeling.step(optimizer, loss, params, cfg.max_grad_norm)
            losses.append(loss.item())
    policy.eval()
    return losses


# --------------------------------------------------------------------------------------------
# Held-out comparison of iterate t with t-1 (the termination rule's evidence)
# --------------------------------------------------------------------------------------------
def compare_iterates(prompts: Sequence[Messages], new: Sequence[str], old: Sequence[str],
                     preference_fn: Any = None, reward_fn: Any = None, alpha: float = 0.05) -> dict:
    """Binomial-test evidence that the new iterate beats the old on held-out prompts, judged
    by ``preference_fn`` (position-debiased) when given, else by comparing rewards."""
    if preference_fn is not None:
        probs = [float(p) for p in preference_fn(list(prompts), list(new), list(old))]
        judged_by = "preference (position-debiased)"
    else:
        rn, rold = reward_fn(list(prompts), list(new)), reward_fn(list(prompts), list(old))
        probs = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(rn, rold)]
        judged_by = "reward comparison"
    wins, losses, ties = count_outcomes(probs)
    out = winrate_test(wins, losses, ties, alpha)
    out["judged_by"] = judged_by
    return out


def _sample_round(cfg: IterativeConfig, generator: Any, prompts: Sequence[Messages],
                  spend: ro.Spend) -> tuple[list[list[str]], list[list[bool]]]:
    """K samples per prompt and whether each ended by itself; with the temperature enhancer each
    prompt's list is K/2 main samples followed by K/2 enhancer (hotter) samples."""
    if cfg.enhancer == "temperature":
        half = max(1, cfg.k // 2)
        main = ro.sample(generator, prompts, half, cfg.sampling, spend)
        hot = SamplingParams(**{**cfg.sampling.__dict__, "temperature": cfg.enhancer_temperature})
        gens = [a + b for a, b in zip(main, ro.sample(generator, prompts, half, hot, spend))]
    elif cfg.enhancer == "rejection":
        gens = ro.sample(generator, prompts, cfg.k, cfg.sampling, spend)
    else:
        raise ValueError(f"enhancer must be 'rejection' or 'temperature', not {cfg.enhancer!r}")
    texts = [[g.text for g in gs] for gs in gens]
    return texts, [ro.finished_flags(gs, cfg.sampling.max_new_tokens) for gs in gens]


def _save_round(folder: str | Path, index: int, policy: nn.Module, optimizer: torch.optim.Optimizer,
                gen: torch.Generator, pairs: Sequence[Pair], meta: dict) -> Path:
    """One finished round, atomically: weights + optimizer + RNG (``state.pt``), the record
    (``meta.json``) and the round's training pairs (``pairs.jsonl``, kept for every round)."""
    pairs_jsonl = "".join(json.dumps(asdict(p)) + "\n" for p in pairs)
    return ck.save_checkpoint(folder, ck.checkpoint_name(index, "round"), {
        "policy": policy.state_dict(), "optimizer": optimizer.state_dict(), "rng": ck.rng_state(gen)}, meta,
        files={"pairs.jsonl": pairs_jsonl})


def train_iterative(policy: nn.Module, tokenizer: Any, prompts: Sequence[Any], make_generator: Any,
                    config: IterativeConfig | None = None, *, reward_fn: Any = None,
                    preference_fn: Any = None, judge_factory: Any = None, gold: dict | None = None,
                    ref: nn.Module | None = None, eval_prompts: Sequence[Any] | None = None,
                    eval_reward_fn: Any = None, eval_sampling: SamplingParams | None = None,
                    checkpoint_dir: str | Path | None = None) -> tuple[nn.Module, OnlineReport]:
    """Run up to ``config.rounds`` rounds of ``config.method``; returns (policy, report).

    Oracles (from the flow): ``reward_fn`` (iterative-dpo, cringe), ``judge_factory`` building a
    reward function on the live model (self-rewarding), ``preference_fn`` (sppo, dno; also the
    termination rule's judge when given), ``gold`` {prompt text: gold response} (dno).
    ``eval_reward_fn`` (default ``reward_fn``) measures progress on ``eval_prompts``.

    ``checkpoint_dir``: every finished round is saved there atomically (``round-000t/``: the
    policy, the optimizer, the RNG states, the round's pairs and the record so far; the refreshed
    reference is the round's policy itself, so it is not stored twice). A call with the same
    folder, config (``rounds`` may grow) and prompts, given the same starting policy, skips the
    finished rounds and continues; a run the termination rule stopped stays stopped.
    """
    cfg = config or IterativeConfig()
    if cfg.method not in METHODS:
        raise ValueError(f"unknown iterative method {cfg.method!r}; known: {', '.join(METHODS)}")
    need = {"iterative-dpo": reward_fn, "cringe": reward_fn, "self-rewarding": judge_factory,
            "sppo": preference_fn, "dno": preference_fn}[cfg.method]
    if need is None:
        raise ValueError(f"method {cfg.method!r} needs its oracle (see train_iterative's docstring)")
    eval_reward_fn = eval_reward_fn or reward_fn
    if eval_reward_fn is None:
        raise ValueError("train_iterative needs eval_reward_fn (or reward_fn) to measure progress")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sft_ref = ref if ref is not None else modeling.frozen_copy(policy)
    ref_t = sft_ref
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    generator = make_generator(policy, tokenizer)
    run = runs.start_run(cfg.method, cfg, checkpoint_dir, make_generator, policy, tokenizer, prompts, eval_prompts,
                       eval_reward_fn, eval_sampling)
    prompts, eval_prompts, eval_sampling, spend, report = (run.prompts, run.eval_prompts, run.eval_sampling,
                                                           run.spend, run.report)
    first = run.first
    modeling.colocate(sft_ref, policy)  # the generator factory may have moved the policy (ref_t is sft_ref)
    rewards_hist = [first["reward"]]
    prev_responses = first["responses"]
    previous_state = None
    stopped = False
    spend, start = runs.resume_into(run, {"policy": policy, "optimizer": optimizer}, gen)
    if run.saved is not None:  # the loop's own record after the newest finished round
        rewards_hist, prev_responses, stopped = (run.meta["rewards_hist"], run.meta["prev_responses"],
                                                 run.meta["stopped"])
        report.termination = next((h["termination"] for h in reversed(report.history) if "termination" in h), None)
        ref_t = modeling.frozen_copy(policy) if cfg.refresh_reference else sft_ref
    for t in range(start, cfg.rounds):
        if stopped:
            break
        idx = torch.randperm(len(prompts), generator=gen)[: cfg.prompts_per_round].tolist()
        round_prompts = [prompts[i] for i in idx]
        policy.eval()
        samples, finished = _sample_round(cfg, generator, round_prompts, spend)
        oracle = judge_factory(policy, tokenizer) if cfg.method == "self-rewarding" else reward_fn
        pairs = build_pairs(cfg, round_prompts, samples, oracle, preference_fn, gold, spend, finished)
        entry: dict = {"round": t + 1, "pairs": len(pairs)}
        if pairs:
            previous_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            entry["loss"] = float(sum(l := train_on_pairs(cfg, policy, ref_t, tokenizer, pairs, optimizer, gen)) / len(l))
        ev = ro.evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling)
        rewards_hist.append(ev["reward"])
        entry["reward"] = ev["reward"]
        if cfg.terminate:
            evidence = compare_iterates(eval_prompts, ev["responses"], prev_responses, preference_fn,
                                        eval_reward_fn, cfg.alpha)
            stop, why = should_stop(evidence, rewards_hist, cfg.min_reward_delta)
            entry["termination"] = {**evidence, "stop": stop, "reason": why}
            report.termination = entry["termination"]
            if stop and rewards_hist[-1] < rewards_hist[-2] and previous_state is not None:
                # the newest iterate is worse on held-out reward: keep iteration t-1
                policy.load_state_dict(previous_state)
                entry["rolled_back"] = True
                rewards_hist[-1] = rewards_hist[-2]
            report.history.append(entry)
            stopped = stop
        else:
            report.history.append(entry)
        if not stopped:
            prev_responses = ev["responses"]
            if cfg.refresh_reference:
                ref_t = modeling.frozen_copy(policy)
        if checkpoint_dir is not None:
            _save_round(checkpoint_dir, t + 1, policy, optimizer, gen, pairs, ck.checkpoint_meta(
                t + 1, run.fingerprint, report, spend, first, rewards_hist=rewards_hist, prev_responses=prev_responses,
                stopped=stopped))
        if stopped:
            break
    final = ro.evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling, ref=sft_ref)
    runs.finish_run(report, final, spend, t0)
    report.extra["rounds_run"] = len(report.history)
    return policy, report
