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
  the summed implicit reward alone. Beam size 1 with ``"q"`` (no length penalty) is greedy
  decoding.

Measured on the toy world (tests/bench/bench_beam.py, protocol v2: three iterative-DPO
policies, 192 fresh held-out prompts): with ``"q"`` the task reward rises with the beam, 0.9516
(greedy) -> 0.9568 / 0.9563 / 0.9563 at beams 2 / 4 / 8 (beam 8 vs greedy p = 0.005; on the
two-digit prompts 0.874 -> 0.910, p = 0.009). But the SFT model with the same beam (its own
likelihood, no reward) does as well (0.9570; DPO + beam vs SFT + beam p = 0.73): there the gain
is that of likelihood search, not of the learned reward. ``"reward"`` alone is over-optimised:
the search finds long answers of high implicit reward and the task reward FALLS as the beam
grows (0.47 -> 0.14). A length penalty of 1 (mean instead of summed log-prob) lowered the beam-8
reward (0.854 -> 0.829, v1 protocol, before the iterative trainers' eos fix): the default 0
keeps eq. 23's sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from alignflow.trainers import encoding, modeling


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
    batch = encoding.encode_samples(tokenizer, [encoding.as_messages(prompt)], [response], [finished])
    lp, _ = encoding.forward_token_logprobs(policy, batch)
    rlp, _ = encoding.forward_token_logprobs(ref, batch)
    mask = batch.action_mask[0]
    ids = batch.actions[0][mask].tolist()
    lp, rlp = lp[0][mask.to(lp.device)].tolist(), rlp[0][mask.to(rlp.device)].tolist()
    return [TokenReward(t, beta * (a - b), a, b) for t, a, b in zip(token_texts(tokenizer, ids), lp, rlp)]


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded response, so that the pieces join to the text.

    A byte-level BPE token may hold part of a character's UTF-8 bytes: decoded alone it is
    U+FFFD. Each piece is the growth of the decoded prefix instead (empty for a token that ends
    inside a character, the whole character on the token that completes it)."""
    pieces, before = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:n]))
        if text.endswith("\ufffd") and n < len(ids):  # an unfinished character: wait for its last byte
            pieces.append("")
            continue
        pieces.append(text[len(before):] if text.startswith(before) else tokenizer.decode([ids[n - 1]]))
        before = text
    return pieces


class _Decoder:
    """One model decoding many rows incrementally with a KV cache (rows can be re-selected,
    duplicated or dropped between steps: beam search's parent pointers)."""

    def __init__(self, model: nn.Module, prompt_ids: Sequence[list[int]], pad: int):
        self.model = model
        self.device = modeling.device_of(model)  # rows live where the model is
        ids, self.mask, pos = (t.to(self.device) for t in encoding.left_padded(prompt_ids, pad))
        self.cache_arg = encoding.cache_kwarg(model)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True)
        self.cache, self.pos = encoding.cache_of(out), pos[:, -1]
        self.logps = torch.log_softmax(out.logits[:, -1].float(), -1)  # [R, V] next-token log-probs

    def step(self, parents: torch.Tensor, tokens: torch.Tensor) -> None:
        """Continue row ``parents[j]`` with ``tokens[j]`` for every new row j."""
        parents, tokens = parents.to(self.device), tokens.to(self.device)
        self.cache.reorder_cache(parents)
        ones = torch.ones(len(parents), 1, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask[parents], ones], 1)
        self.pos = self.pos[parents] + 1
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                         use_cache=True, **{self.cache_arg: self.cache})
        self.cache = encoding.cache_of(out)
        self.logps = torch.log_softmax(out.logits[:, -1].float(), -1)


def _final_score(score: float, n_tokens: int, length_penalty: float) -> float:
    """Ranking score of a complete hypothesis: ``score / n_tokens**length_penalty`` (0 = the sum)."""
    return score / max(n_tokens, 1) ** length_penalty if length_penalty else score


@torch.no_grad()
def beam_search_batch(policy: nn.Module, ref: nn.Module, tokenizer: Any, prompts: Sequence[Any], beam_size: int = 4,
                      beta: float = 0.1, max_new_tokens: int = 24, expand: int | None = None,
                      objective: str = "q", length_penalty: float = 0.0,
                      with_ids: bool = False) -> list[tuple[str, float]] | list[tuple[str, float, list[int]]]:
    """Reward-guided beam search for many prompts at once; returns (best response, its score)
    per prompt, the score being the summed objective of the returned response (eos included);
    ``with_ids``: (response, score, its token ids as searched, eos included when it finished). A
    byte-level BPE text can re-encode to other tokens than the searched ones, which score otherwise.

    Per step every live beam proposes its ``expand`` (default ``max(beam_size, 2)``) most likely
    next tokens under the policy, scored by the running sum of ``objective``: ``"q"``
    ``beta*log pi`` (eq. 23's Q) or ``"reward"`` ``beta*log(pi/pi_ref)``. The ``beam_size``
    best continuations stay live; a candidate ending in eos that ranks within the best
    ``beam_size`` becomes a finished hypothesis (kept apart, so finished answers do not take
    live slots). A prompt stops when it has ``beam_size`` finished hypotheses and (for ``"q"``
    without length penalty, where scores only fall) no live beam can still beat the worst of
    them; beams alive after ``max_new_tokens`` count as (truncated) hypotheses. The answer is the
    hypothesis with the best ``score / n_tokens**length_penalty``. Beam size 1 with ``"q"`` and no
    length penalty is greedy decoding. One KV-cached forward per step for all live beams of all prompts (and one
    of the reference for ``"reward"``).
    """
    if objective not in ("q", "reward"):
        raise ValueError("objective must be 'q' or 'reward'")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    expand = expand or max(beam_size, 2)
    prompt_ids = [encoding.encode_prompt(tokenizer, encoding.as_messages(p)) for p in prompts]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    dec = _Decoder(policy, prompt_ids, pad)
    ref_dec = _Decoder(ref, prompt_ids, pad) if objective == "reward" else None
    # live rows, aligned with the decoders' rows: (prompt index, tokens, summed score)
    live: list[tuple[int, list[int], float]] = [(i, [], 0.0) for i in range(len(prompts))]
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in prompts]  # (rank score, tokens, score)
    done = [False] * len(prompts)
    monotone = objective == "q" and not length_penalty
    for _ in range(max_new_tokens):
        gains = beta * dec.logps if ref_dec is None else beta * (dec.logps - ref_dec.logps.to(dec.logps.device))
        top = dec.logps.topk(min(expand, dec.logps.shape[-1]), -1).indices  # [R, expand]
        top_ids, cand_gain = top.tolist(), gains.gather(-1, top).tolist()  # one host copy per step
        by_prompt: dict[int, list[tuple[float, int, int]]] = {}
        for row, (i, _, score) in enumerate(live):
            for tok, g in zip(top_ids[row], cand_gain[row]):
                by_prompt.setdefault(i, []).append((score + g, row, tok))
        parents, tokens, new_live = [], [], []
        for i, cands in by_prompt.items():
            kept = 0
            for rank, (score, row, tok) in enumerate(sorted(cands, key=lambda c: -c[0])):
                if tok == eos:
                    if rank < beam_size:
                        seq = live[row][1] + [tok]
                        finished[i].append((_final_score(score, len(seq), length_penalty), seq, score))
                    continue
                parents.append(row)
                tokens.append(tok)
                new_live.append((i, live[row][1] + [tok], score))
                kept += 1
                if kept == beam_size:
                    break
            finished[i] = sorted(finished[i], key=lambda h: -h[0])[:beam_size]
            best_live = max((s for j, _, s in new_live if j == i), default=float("-inf"))
            if len(finished[i]) == beam_size and monotone and best_live <= finished[i][-1][0]:
                done[i] = True
        keep = [j for j, (i, _, _) in enumerate(new_live) if not done[i]]
        if not keep:
            live = []
            break
        live = [new_live[j] for j in keep]
        parents_t = torch.tensor([parents[j] for j in keep], dtype=torch.long)
        tokens_t = torch.tensor([tokens[j] for j in keep], dtype=torch.long)
        dec.step(parents_t, tokens_t)
        if ref_dec is not None:
            ref_dec.step(parents_t, tokens_t)
    for i, seq, score in live:  # out of budget: truncated hypotheses compete as they are
        finished[i].append((_final_score(score, len(seq), length_penalty), seq, score))
    out = []
    for hyps in finished:
        _, seq, score = max(hyps, key=lambda h: h[0])
        text = tokenizer.decode([t for t in seq if t != eos], skip_special_tokens=True)
        out.append((text, score, seq) if with_ids else (text, score))
    return out


def beam_search(policy: nn.Module, ref: nn.Module, tokenizer: Any, prompt: Any, beam_size: int = 4,
                beta: float = 0.1, max_new_tokens: int = 24, expand: int | None = None,
                objective: str = "q", length_penalty: float = 0.0) -> tuple[str, float]:
    """Reward-guided beam search for one prompt; returns (best response, its score)."""
    return beam_search_batch(policy, ref, tokenizer, [prompt], beam_size, beta, max_new_tokens, expand, objective,
                             length_penalty)[0]
