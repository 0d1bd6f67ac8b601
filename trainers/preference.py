"""The preference trainer: any loss of ``trainers.losses`` on pairwise, listwise or binary data.

``PreferenceTrainer`` is a ``transformers.Trainer`` (accelerate, DeepSpeed/FSDP, PEFT/LoRA, bf16,
gradient accumulation, checkpoint/resume and report_to come with it). Each step:

1. one forward pass over all sequences of the batch (``trainers.logprobs``; by default the
   shared-prompt layout computes each prompt once for all its responses), giving policy
   log-probs summed over response tokens and token counts;
2. reference log-probs read from the batch (precomputed ``ref_*`` columns; the reference model
   is never loaded during training; ``trainers.precompute`` fills them once beforehand);
3. ``compute_loss(name, batch, **params)`` -> per-example losses -> batch mean.

Logged (means over the steps since the last log): loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, kl/implicit, logps/*, lengths/chosen, lengths/rejected
(listwise: best vs worst response by score; binary: desirable vs undesirable, and kl/kto_ref).

Token-level losses take what they need from the same forward pass (``trainers.token_level``):
``tdpo`` (eq. 25-28) the sequential KL against a reference model loaded for training (the
trade-off against stored per-token columns is measured in ``trainers.token_level``), also
logged as kl/seq_chosen, kl/seq_rejected; ``cringe`` (eq. 29-30) the top-k logits of the
policy itself; ``nn`` (eq. 53) trains on kind ``negatives`` (``trainers.negatives``: a negative
and K samples of the reference per example, pi_ref+ = the previous epoch's policy), logged as
logratio/negative, logratio/samples.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from transformers import Trainer

from alignflow.trainers import token_level
from alignflow.trainers.collators import collator_for
from alignflow.trainers.logprobs import SequenceBatch, resolve_layout, sequence_logps
from alignflow.trainers.losses import (
    BetaDPOState,
    MissingBatchKeyError,
    compute_loss,
    kto_kl_from_mismatched,
    loss_spec,
    pairwise_metrics,
    resolve_params,
)
from alignflow.trainers.modeling import frozen_copy

logger = logging.getLogger(__name__)

# Losses that need more than per-sequence summaries (per-token vocabulary log-probs, top-k
# logits, a value head); the summary trainer refuses them with this hint.
NEEDS_MORE_THAN_SUMMARIES = {
    "dro": "a value network V(x) and a reward column (trainers.online.dro_v: `alignflow train DATA --loss dro` "
           "on binary data, or `alignflow online dro-v`)",
    "bt": "reward-model scores (it trains a reward model, not a policy: `alignflow online reward-model`)",
}

# Losses whose extra tensors this trainer computes from the forward pass (trainers.token_level),
# with the reference each one uses: tdpo a live reference model (its per-token distributions),
# cringe none, nn the ref_logps of kind "negatives" (samples: pi_ref; negative: pi_ref+).
TOKEN_LEVEL = {"tdpo": "model", "cringe": None, "nn": "columns"}


def loss_kind(name: str, data_kind: str) -> str:
    """Check that loss ``name`` applies to ``data_kind`` data (ValueError otherwise)."""
    spec = loss_spec(name)
    if name in NEEDS_MORE_THAN_SUMMARIES:
        raise ValueError(f"loss {name!r} needs {NEEDS_MORE_THAN_SUMMARIES[name]}; "
                         "the preference trainer trains losses of per-sequence log-probs")
    if name == "nn":  # examples of kind "negatives" are built from binary or pairwise data
        if data_kind not in ("negatives", "binary", "pairwise"):
            raise ValueError(f"loss 'nn' takes binary (label-false rows) or pairwise (rejected answers) data "
                             f"plus K samples of the reference per prompt, the dataset is {data_kind}")
        return data_kind
    allowed = {"any": {"pairwise", "listwise", "binary"}}.get(spec.kind, set(spec.kind.split(" or ")))
    if data_kind not in allowed:
        raise ValueError(f"loss {name!r} takes {spec.kind} data, the dataset is {data_kind}")
    return data_kind


def _dummy_batch(kind: str, with_ref: bool) -> dict[str, torch.Tensor]:
    b = {"pairwise": {"chosen_logps": torch.full((2,), -3.0), "rejected_logps": torch.full((2,), -4.0),
                      "chosen_tokens": torch.full((2,), 3), "rejected_tokens": torch.full((2,), 4)},
         "listwise": {"logps": torch.full((2, 3), -3.0), "tokens": torch.full((2, 3), 3),
                      "scores": torch.tensor([[1.0, 0.0, 0.5]] * 2), "mask": torch.ones(2, 3, dtype=torch.bool)},
         "binary": {"logps": torch.full((2,), -3.0), "tokens": torch.full((2,), 3),
                    "label": torch.tensor([False, False]), "kl": torch.tensor(0.0)}}[kind]
    if with_ref:
        for key in [k for k in b if k.endswith("logps")]:
            b["ref_" + key] = b[key] - 0.5
    return b


def needs_reference(name: str, kind: str) -> bool:
    """Whether loss ``name`` reads ``ref_*`` keys (probed on a batch without them)."""
    if name in TOKEN_LEVEL:
        return TOKEN_LEVEL[name] == "columns"
    try:
        compute_loss(name, _dummy_batch(kind, with_ref=False))
    except MissingBatchKeyError as exc:
        if "ref_" in str(exc):
            return True
        raise
    return False


def kto_balance_warning(labels: Sequence[bool], lambda_d: float, lambda_u: float) -> str | None:
    """Survey 3.6.1: keep lambda_d*n_D / (lambda_u*n_U) in [1, 4/3]; the message if it is not."""
    n_d = sum(1 for x in labels if x)
    n_u = len(labels) - n_d
    if n_u == 0 or lambda_u == 0:
        return None if n_d == 0 else (f"KTO: no weighted undesirable examples (n_desirable={n_d}, n_undesirable={n_u}, "
                                      f"lambda_u={lambda_u}); survey 3.6.1 recommends a ratio in [1, 4/3]")
    ratio = lambda_d * n_d / (lambda_u * n_u)
    if 1.0 <= ratio <= 4.0 / 3.0 + 1e-12:
        return None
    lo, hi = n_u / max(n_d, 1), 4.0 / 3.0 * n_u / max(n_d, 1)
    return (f"KTO: lambda_d*n_desirable/(lambda_u*n_undesirable) = {lambda_d}*{n_d}/({lambda_u}*{n_u}) = {ratio:.3f} "
            f"is outside [1, 4/3] (survey 3.6.1); e.g. lambda_d/lambda_u in [{lo:.3f}, {hi:.3f}]")


class ExampleDataset(torch.utils.data.Dataset):
    """Pre-tokenized examples (``trainers.collators.pretokenize``) as a map-style dataset."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off: the policy's log-probs must be those of the reference at step 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class PreferenceTrainer(Trainer):
    """``transformers.Trainer`` for every per-sequence loss of the registry, and the token-level
    ``tdpo`` (reference model kept live: ``ref_model``, default a frozen copy of the initial
    policy), ``cringe`` and ``nn`` (kind ``negatives``, see ``trainers.negatives``).

    model: the policy (a causal LM). train_dataset: pre-tokenized examples (list or
    ``ExampleDataset``) with reference log-probs when the loss needs them; if they are absent
    they are computed once with ``ref_model`` (default: the policy before training, i.e. the
    usual reference) before the first step. kind: pairwise | listwise | binary. loss,
    loss_params: name and parameters of ``trainers.losses``. layout: "packed" (shared prompt)
    or "plain". max_batch_tokens: a batch whose padded layout exceeds this many tokens runs as
    chunks, each recomputed in the backward pass (the same gradient, memory of one chunk).
    Other keyword arguments go to ``transformers.Trainer``.
    """

    def __init__(self, model, args, train_dataset, *, kind: str, loss: str = "dpo",
                 loss_params: dict[str, Any] | None = None, pad_token_id: int | None = None,
                 layout: str = "packed", ref_model=None, ref_batch_size: int = 32,
                 max_batch_tokens: int | None = None, **kwargs):
        loss_kind(loss, kind)
        params = dict(loss_params or {})
        if loss == "beta_dpo" and params.get("m0") is None:
            params["m0"] = BetaDPOState()  # running mean M0 of eq. 14, kept for the run
        self.loss_name = loss
        self.loss_params = resolve_params(loss, params)
        self.kind = kind
        self.metric_beta = float(self.loss_params.get("beta", 0.1)) if isinstance(
            self.loss_params.get("beta", 0.1), (int, float)) else 0.1
        examples = train_dataset.examples if isinstance(train_dataset, ExampleDataset) else list(train_dataset)
        if pad_token_id is None:
            tok = kwargs.get("processing_class")
            pad_token_id = getattr(tok, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self.layout = resolve_layout(model, layout)
        disable_dropout(model)
        self.needs_ref = needs_reference(loss, kind)
        self.pad_token_id, self.ref_batch_size = pad_token_id, ref_batch_size
        if max_batch_tokens is not None and loss in TOKEN_LEVEL:
            raise ValueError(f"--max-batch-tokens runs per-sequence losses in chunks; {loss!r} reads per-token "
                             "logits of the whole batch (lower --per_device_train_batch_size instead)")
        if loss == "nn" and kind != "negatives":
            raise ValueError("loss 'nn' trains on examples of kind 'negatives' (trainers.negatives: "
                             "negatives_table + pretokenize_negatives from the data and K samples per prompt)")
        # tdpo: the reference's next-token distributions come from a live model (trainers.token_level)
        self.ref_model = None
        if TOKEN_LEVEL.get(loss) == "model":
            self.ref_model = frozen_copy(model) if ref_model is None else ref_model.eval().requires_grad_(False)
        self.with_kl = loss == "kto"
        if loss == "kto":
            problem = kto_balance_warning([e["label"] for e in examples], self.loss_params["lambda_d"],
                                          self.loss_params["lambda_u"])
            if problem:
                warnings.warn(problem, stacklevel=2)
                logger.warning(problem)
        if loss == "npo" and any(e["label"] for e in examples):
            n_true = sum(1 for e in examples if e["label"])
            raise ValueError(f"loss 'npo' trains on undesirable responses only; the dataset has {n_true} label-true rows")
        missing = self.needs_ref and not all("ref_logps" in e and (not self.with_kl or "ref_kl_logps" in e)
                                             for e in examples)
        if missing:
            from alignflow.trainers.precompute import fill_reference_logps

            logger.warning("reference log-probs absent: computing them once with %s before training",
                           "the given reference model" if ref_model is not None else "the initial policy")
            fill_reference_logps(ref_model if ref_model is not None else model, examples, pad_token_id,
                                 batch_size=ref_batch_size, with_kl=self.with_kl, layout=self.layout)
        kwargs.setdefault("data_collator", collator_for(kind, pad_token_id, self.layout, self.with_kl,
                                                        max_tokens=max_batch_tokens))
        args.remove_unused_columns = False
        super().__init__(model=model, args=args, train_dataset=ExampleDataset(examples), **kwargs)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        if kind == "negatives":  # eq. 53's pi_ref+: the policy of the previous epoch
            from alignflow.trainers.negatives import PreviousEpochReference

            self.add_callback(PreviousEpochReference(self))
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self._metrics: dict[str, list[float]] = defaultdict(list)

    # -- loss -------------------------------------------------------------------------------------
    def loss_batch(self, model, inputs: dict) -> dict[str, torch.Tensor]:
        """The loss batch of DESIGN.md ("Loss interface") from collated inputs: policy log-probs
        from one forward pass plus the reference/label/score tensors of the collator."""
        if self.loss_name in TOKEN_LEVEL:
            return self.token_level_batch(model, inputs)
        logps, tokens = policy_logps(model, inputs)
        batch: dict[str, torch.Tensor] = {}
        if self.kind == "pairwise":
            batch.update(chosen_logps=logps[:, 0], rejected_logps=logps[:, 1],
                         chosen_tokens=tokens[:, 0], rejected_tokens=tokens[:, 1])
            for key in ("ref_chosen_logps", "ref_rejected_logps", "chosen_winrate", "rejected_winrate"):
                if key in inputs:
                    batch[key] = inputs[key]
        elif self.kind == "listwise":
            batch.update(logps=logps, tokens=tokens, scores=inputs["scores"], mask=inputs["mask"])
            if "ref_logps" in inputs:
                batch["ref_logps"] = inputs["ref_logps"]
        else:
            batch.update(logps=logps[:, 0], tokens=tokens[:, 0], label=inputs["label"])
            if "ref_logps" in inputs:
                batch["ref_logps"] = inputs["ref_logps"]
            if self.with_kl:
                # KTO eq. 33: reference point from the batch's mismatched pairs, no gradient
                with torch.no_grad():
                    kl_logps, kl_tokens = policy_logps(model, inputs, "kl_seqs")
                kl = kto_kl_from_mismatched(kl_logps[:, 0], inputs["ref_kl_logps"], kl_tokens[:, 0] > 0)
                if self.accelerator.num_processes > 1:
                    kl = self.accelerator.gather(kl.reshape(1)).mean()
                batch["kl"] = kl
        return batch

    def token_level_batch(self, model, inputs: dict) -> dict[str, torch.Tensor]:
        """The loss batch of ``tdpo``, ``cringe`` and ``nn``: the summaries and the per-token
        tensors (``trainers.token_level``) from ONE forward pass of the policy (plus, for tdpo,
        one of the reference without grad)."""
        seqs = SequenceBatch(**inputs["seqs"])
        logits = token_level.target_logits(model, seqs)
        logps, tokens = token_level.summaries(logits, seqs)
        if self.kind == "negatives":  # response 0 the negative y_l, 1..K the samples of pi_ref
            ref = inputs["ref_logps"]
            return {"rejected_logps": logps[:, 0], "ref_rejected_logps": ref[:, 0], "rejected_tokens": tokens[:, 0],
                    "sample_logps": logps[:, 1:], "ref_sample_logps": ref[:, 1:], "sample_mask": inputs["sample_mask"],
                    "sample_tokens": tokens[:, 1:]}
        if self.kind == "binary":
            batch = {"logps": logps[:, 0], "tokens": tokens[:, 0], "label": inputs["label"]}
            batch.update(token_level.cringe_tensors(logits, seqs, 0, self.loss_params["k"]))
            return batch
        batch = {"chosen_logps": logps[:, 0], "rejected_logps": logps[:, 1],
                 "chosen_tokens": tokens[:, 0], "rejected_tokens": tokens[:, 1]}
        if self.loss_name == "cringe":  # pairwise, eq. 30: the rejected answer's tokens are the negatives
            batch.update(token_level.cringe_tensors(logits, seqs, 1, self.loss_params["k"], prefix="rejected_"))
            return batch
        with torch.no_grad():
            ref_logits = token_level.target_logits(self.ref_model, seqs)
        ref_logps, _ = token_level.summaries(ref_logits, seqs)
        seq_kl = token_level.sequence_kl(ref_logits, logits, seqs)
        batch.update(ref_chosen_logps=ref_logps[:, 0], ref_rejected_logps=ref_logps[:, 1],
                     chosen_seq_kl=seq_kl[:, 0], rejected_seq_kl=seq_kl[:, 1])
        return batch

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        # accelerate puts autocast around ``model.forward``; the log-prob path calls the decoder
        # and the LM head directly, so mixed precision (bf16/fp16) is entered here instead
        return self.accelerator.autocast()

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        batch = self.loss_batch(model, inputs)
        per_example = compute_loss(self.loss_name, batch, **self.loss_params)
        loss = per_example.mean()
        self._record_metrics(batch, per_example)
        loss = loss.to(next(model.parameters()).dtype) if loss.dtype == torch.float64 and \
            next(model.parameters()).dtype != torch.float64 else loss
        return (loss, batch) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- metrics ----------------------------------------------------------------------------------
    def _record_metrics(self, batch: dict[str, torch.Tensor], per_example: torch.Tensor) -> None:
        for key, value in self.batch_metrics(batch).items():
            self._metrics[key].append(float(value))

    def batch_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detached 0-dim metrics of one batch (see module docstring)."""
        beta = self.metric_beta
        with torch.no_grad():
            if self.kind == "negatives":
                return _negatives_metrics(batch)
            if self.kind == "pairwise":
                view = batch
            elif self.kind == "listwise":
                view = _best_worst_view(batch)
            else:
                return _binary_metrics(batch, beta)
            out = {"lengths/chosen": view["chosen_tokens"].double().mean(),
                   "lengths/rejected": view["rejected_tokens"].double().mean()}
            if "ref_chosen_logps" in view:
                out.update(pairwise_metrics(view, beta))
            else:  # reference-free run without reference columns: what can be said without them
                out.update({"logps/chosen": view["chosen_logps"].mean(), "logps/rejected": view["rejected_logps"].mean(),
                            "rewards/accuracies": (view["chosen_logps"] / view["chosen_tokens"].clamp(min=1)
                                                   > view["rejected_logps"] / view["rejected_tokens"].clamp(min=1)
                                                   ).double().mean()})
            if "chosen_seq_kl" in view:  # tdpo
                out.update({"kl/seq_chosen": view["chosen_seq_kl"].mean(),
                            "kl/seq_rejected": view["rejected_seq_kl"].mean()})
            return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        for key, values in self._metrics.items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics.clear()
        super().log(logs, start_time)


def policy_logps(model, inputs: dict, name: str = "seqs") -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` of the collated ``inputs[name]``, or of its chunks (``name + "_chunks"``,
    see ``collators._Collator``): each chunk under activation checkpointing when gradients are
    on, so the backward pass recomputes one chunk at a time; results padded to the widest K."""
    if name in inputs:
        return sequence_logps(model, SequenceBatch(**inputs[name]))
    chunks = inputs[name + "_chunks"]
    width = max(c["num_responses"] for c in chunks)
    logps, tokens = [], []
    for chunk in chunks:
        if torch.is_grad_enabled():
            lp, tk = torch.utils.checkpoint.checkpoint(_chunk_logps, model, chunk, use_reentrant=False)
        else:
            lp, tk = _chunk_logps(model, chunk)
        pad = width - lp.shape[1]
        logps.append(torch.nn.functional.pad(lp, (0, pad)))
        tokens.append(torch.nn.functional.pad(tk, (0, pad)))
    return torch.cat(logps), torch.cat(tokens)


def _chunk_logps(model, chunk: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return sequence_logps(model, SequenceBatch(**chunk))


def _best_worst_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Listwise batch seen as pairs (best-scored response, worst-scored response) for metrics."""
    mask = batch["mask"].bool()
    scores = batch["scores"].masked_fill(~mask, -math.inf)
    best = scores.argmax(-1, keepdim=True)
    worst = batch["scores"].masked_fill(~mask, math.inf).argmin(-1, keepdim=True)
    view = {}
    for key in ("logps", "tokens", "ref_logps"):
        if key in batch:
            prefix = "ref_" if key == "ref_logps" else ""
            base = "logps" if key != "tokens" else "tokens"
            view[f"{prefix}chosen_{base}"] = batch[key].gather(-1, best).squeeze(-1)
            view[f"{prefix}rejected_{base}"] = batch[key].gather(-1, worst).squeeze(-1)
    return view


def _binary_metrics(batch: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    label = batch["label"].bool()
    tokens = batch["tokens"].double()
    out: dict[str, torch.Tensor] = {}
    for name, sel in (("chosen", label), ("rejected", ~label)):
        if bool(sel.any()):
            out[f"lengths/{name}"] = tokens[sel].mean()
            out[f"logps/{name}"] = batch["logps"][sel].double().mean()
            if "ref_logps" in batch:
                out[f"rewards/{name}"] = (beta * (batch["logps"] - batch["ref_logps"]))[sel].double().mean()
    if "ref_logps" in batch:
        r = batch["logps"] - batch["ref_logps"]
        out["kl/implicit"] = (-r).double().mean()
        out["rewards/accuracies"] = ((r > 0) == label).double().mean()
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if "kl" in batch:
        out["kl/kto_ref"] = torch.as_tensor(batch["kl"]).double()
    return out


def _negatives_metrics(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn: log-ratio of the negatives against pi_ref+ and mean log-ratio of the samples against pi_ref."""
    mask = batch["sample_mask"].bool()
    ratio = (batch["sample_logps"] - batch["ref_sample_logps"]).double().masked_fill(~mask, 0.0)
    return {"logratio/negative": (batch["rejected_logps"] - batch["ref_rejected_logps"]).double().mean(),
            "logratio/samples": (ratio.sum(-1) / mask.sum(-1).clamp(min=1)).mean(),
            "logps/negative": batch["rejected_logps"].double().mean(),
            "lengths/negative": batch["rejected_tokens"].double().mean()}
