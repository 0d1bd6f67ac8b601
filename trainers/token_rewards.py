"""DPO as token-level rewards (survey 3.4.1, "from r to Q*").

In the token-level MDP a DPO policy defines the per-token reward (eq. 21-23)::

    r(s_t, a_t) = beta * log( pi(a_t|s_t) / pi_ref(a_t|s_t) )   (+ a potential V(s_t) - V(s_{t+1}))

and ``sum_t beta*log pi(a_t|s_t) = sum_t [r(s_t, a_t) + beta*log pi_ref(a_t|s_t)] + V(s_0)``
(eq. 23): the DPO policy's own log-likelihood is the optimal Q-value up to a per-prompt constant.

- ``token_rewards``: the implicit reward of every token of any response (where it went wrong:
  the most negative tokens).
- ``beam_search``: reward-guided beam search. Candidates are each beam's ``expand`` most likely
  next tokens under the policy; beams are ranked by ``objective``: ``"q"`` = the summed
  ``beta*log pi`` (eq. 23's Q, i.e. implicit reward plus ``beta*log pi_ref``) or ``"reward"`` =
  the summed implicit reward alone. Beam size 1 with ``"q"`` is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from trainers.iterative import rollout as ro


@dataclass
class TokenReward:
    token: str
    reward: float  # beta * (log pi - log pi_ref)
    logp: float
    ref_logp: float


@torch.no_grad()
def token_rewards(policy: nn.Module, ref: nn.Module, tokenizer: Any, prompt: Any, response: str,
                  beta: float = 0.1, finished: bool = True) -> list[TokenReward]:
    """Per-token implicit rewards of ``response`` (eos included when ``finished``)."""
    batch = ro.encode_samples(tokenizer, [ro.as_messages(prompt)], [response], [finished])
    lp, _ = ro.forward_token_logprobs(policy, batch)
    rlp, _ = ro.forward_token_logprobs(ref, batch)
    mask = batch.action_mask[0]
    ids = batch.actions[0][mask].tolist()
    lp, rlp = lp[0][mask].tolist(), rlp[0][mask].tolist()
    return [TokenReward(tokenizer.decode([i]), beta * (a - b), a, b) for i, a, b in zip(ids, lp, rlp)]


def _next_logps(model: nn.Module, seqs: Sequence[list[int]], pad: int) -> torch.Tensor:
    """Next-token log-probs ``[N, V]`` after each (left-padded) sequence."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
    return torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def beam_search_batch(policy: nn.Module, ref: nn.Module, tokenizer: Any, prompts: Sequence[Any], beam_size: int = 4,
                      beta: float = 0.1, max_new_tokens: int = 24, expand: int | None = None,
                      objective: str = "q") -> list[tuple[str, float]]:
    """Reward-guided beam search for many prompts at once (all live beams of all prompts in
    one forward per step); returns (best response, its score) per prompt."""
    if objective not in ("q", "reward"):
        raise ValueError("objective must be 'q' or 'reward'")
    expand = expand or max(beam_size, 2)
    prompt_ids = [ro.encode_prompt(tokenizer, ro.as_messages(p)) for p in prompts]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # per prompt: list of (tokens, score, finished)
    beams: list[list[tuple[list[int], float, bool]]] = [[([], 0.0, False)] for _ in prompts]
    for _ in range(max_new_tokens):
        live = [(i, b) for i, bs in enumerate(beams) for b in bs if not b[2]]
        if not live:
            break
        seqs = [prompt_ids[i] + b[0] for i, b in live]
        lp = _next_logps(policy, seqs, pad)
        rlp = _next_logps(ref, seqs, pad) if objective == "reward" else None
        top = lp.topk(min(expand, lp.shape[-1]), -1)
        cands: list[list[tuple[list[int], float, bool]]] = [[b for b in bs if b[2]] for bs in beams]
        for row, (i, b) in enumerate(live):
            for logp, tok in zip(top.values[row].tolist(), top.indices[row].tolist()):
                gain = beta * logp if objective == "q" else beta * (logp - float(rlp[row, tok]))
                cands[i].append((b[0] + [tok], b[1] + gain, tok == eos))
        beams = [sorted(c, key=lambda c_: c_[1], reverse=True)[:beam_size] for c in cands]
    out = []
    for bs in beams:
        best = max(bs, key=lambda c: c[1])
        out.append((tokenizer.decode([t for t in best[0] if t != eos], skip_special_tokens=True), best[1]))
    return out


def beam_search(policy: nn.Module, ref: nn.Module, tokenizer: Any, prompt: Any, beam_size: int = 4,
                beta: float = 0.1, max_new_tokens: int = 24, expand: int | None = None,
                objective: str = "q") -> tuple[str, float]:
    """Reward-guided beam search for one prompt; returns (best response, its score)."""
    return beam_search_batch(policy, ref, tokenizer, [prompt], beam_size, beta, max_new_tokens, expand, objective)[0]
