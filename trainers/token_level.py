"""The per-token tensors of token-level losses, from the same forward pass as the summaries.

TDPO (survey eq. 25-28) reads the sequential KL of eq. 27, ``sum_t KL(pi_ref(.|x, y<t) ||
pi_theta(.|x, y<t))``, over every response; CRINGE (eq. 29-30) reads, at every token of a
negative response, that token's logit and the top-k other logits. Both come from the logits at
the response-token targets of a ``trainers.logprobs.SequenceBatch`` (``[N, V]``, N response
tokens in the batch), so one forward pass of the policy gives the per-sequence summaries and
these tensors together, in the packed or the plain layout alike.

TDPO's reference is a live model (``PreferenceTrainer`` loads it for ``tdpo``), not stored
columns. Measured on the toy world (``tests/bench/bench_tdpo_reference.py``: 2-core CPU, one
thread, char-level Llama of 538 k parameters, V = 104, 64 best-vs-worst pairs with 2,754
response tokens, batch 16, 3 epochs, best of 3 runs each in one process):

- the live reference costs one more copy of the weights (no gradients, no optimizer state) and
  one forward pass without grad per step: TDPO trained in 5.80 s against DPO's 5.18 s with
  cached reference columns (1.12x), and needs no precompute stage. Beyond the summaries it holds
  ``p_ref`` ``[N, V]`` for the backward pass (the KL's cross term is ``sum_v p_ref * logits -
  logsumexp(logits)``, so no policy log-softmax is materialised);
- storing the reference's next-token distributions instead (``precompute-ref --per-token``)
  is ``tokens x V x 4`` bytes: 1.15 MB of float32 for these 64 pairs (1.65 MB as zstd Parquet:
  probabilities do not compress), against 5.3 KB for the pairs themselves (Arrow). At a real
  vocabulary it is 128 KB (V = 32k) to 608 KB (V = 152k) per response token: 100-490 MB for
  one pair of 400-token responses, 1-5 TB for 10k pairs, all read back every epoch. Keeping
  only the top-k entries would change the KL (its tail is what a sequential KL regularises),
  so there is no exact cheap form of the stored variant.
"""

from __future__ import annotations

import torch

from alignflow.trainers.logprobs import SequenceBatch, _head_inputs
from alignflow.trainers.losses import cringe_topk_excluding


def target_logits(model: torch.nn.Module, seqs: SequenceBatch) -> torch.Tensor:
    """Logits ``[N, V]`` at the response-token targets of ``seqs``, in float32 (float64 for a
    float64 model; a bf16 model's logits are upcast, as ``sequence_logps`` does)."""
    logits = _head_inputs(model, seqs)
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def summaries(logits: torch.Tensor, seqs: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts ``[B, K]`` from target logits (the same
    numbers as ``sequence_logps`` on the same batch)."""
    token_logps = logits.gather(-1, seqs.target_ids[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return per_sequence_sum(token_logps, seqs), per_sequence_count(seqs)


def per_sequence_sum(values: torch.Tensor, seqs: SequenceBatch) -> torch.Tensor:
    """``[N]`` per-token values summed per (example, response): ``[B, K]``."""
    size = seqs.num_examples * seqs.num_responses
    out = torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, seqs.target_seq, values)
    return out.view(seqs.num_examples, seqs.num_responses)


def per_sequence_count(seqs: SequenceBatch) -> torch.Tensor:
    size = seqs.num_examples * seqs.num_responses
    return torch.bincount(seqs.target_seq, minlength=size).view(seqs.num_examples, seqs.num_responses)


def sequence_kl(ref_logits: torch.Tensor, policy_logits: torch.Tensor, seqs: SequenceBatch) -> torch.Tensor:
    """Eq. 27, ``D_SeqKL(x, y; pi_ref || pi_theta)`` of every response: ``[B, K]``.

    Per token ``KL_t = sum_v p_ref (log p_ref - log p_theta)
    = sum_v p_ref log p_ref - (sum_v p_ref * logits_v - logsumexp(logits))`` (``sum_v p_ref = 1``),
    so the policy side needs no log-softmax tensor; the gradient reaches ``policy_logits`` only.
    Zero-probability reference entries contribute 0. Equal to ``losses.sequential_kl`` on the
    padded ``[B, T, V]`` log-softmaxes (tested).
    """
    with torch.no_grad():
        ref_logp = torch.log_softmax(ref_logits.to(policy_logits.dtype), dim=-1)
        p_ref = ref_logp.exp()
        neg_entropy = torch.where(p_ref > 0, p_ref * ref_logp, torch.zeros_like(p_ref)).sum(-1)
    cross = (p_ref * policy_logits).sum(-1) - torch.logsumexp(policy_logits, dim=-1)
    return per_sequence_sum(neg_entropy - cross, seqs)


def response_token_grid(seqs: SequenceBatch, response: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the targets of response ``response`` of each example go in a ``[B, T]`` grid.

    Returns ``(select [N] bool, row [n], col [n])``: which targets belong to that response, and
    for those their example and their position in the response (T = the longest one).
    Targets of one response are contiguous and in order in both layouts (``build_sequence_batch``).
    """
    counts = per_sequence_count(seqs).flatten()
    starts = counts.cumsum(0) - counts
    position = torch.arange(seqs.target_seq.numel(), device=seqs.target_seq.device) - starts[seqs.target_seq]
    select = seqs.target_seq % seqs.num_responses == response
    return select, seqs.target_seq[select] // seqs.num_responses, position[select]


def cringe_tensors(logits: torch.Tensor, seqs: SequenceBatch, response: int, k: int,
                   prefix: str = "") -> dict[str, torch.Tensor]:
    """The token tensors of loss ``cringe`` (eq. 29) for response ``response`` of every example:
    ``{prefix}token_logits`` ``[B, T]`` (the logit of each token y_t-), ``{prefix}topk_logits``
    ``[B, T, k]`` (the k highest other logits, ``losses.cringe_topk_excluding``) and
    ``{prefix}token_mask`` ``[B, T]`` bool, from the policy's target logits (with gradient)."""
    select, row, col = response_token_grid(seqs, response)
    topk, token = cringe_topk_excluding(logits[select], seqs.target_ids[select], k)
    width = int(col.max()) + 1 if col.numel() else 1
    shape = (seqs.num_examples, width)
    token_logits = torch.zeros(shape, dtype=logits.dtype, device=logits.device).index_put((row, col), token)
    topk_logits = torch.zeros(shape + (k,), dtype=logits.dtype, device=logits.device).index_put((row, col), topk)
    mask = torch.zeros(shape, dtype=torch.bool, device=logits.device).index_put(
        (row, col), torch.ones_like(col, dtype=torch.bool))
    return {f"{prefix}token_logits": token_logits, f"{prefix}topk_logits": topk_logits, f"{prefix}token_mask": mask}
