"""Negating Negatives (D2O, survey 3.10.1, eq. 53): its data and its two references.

Eq. 53: ``-log sigmoid(gamma/K * sum_i log pi(y_i|x)/pi_ref(y_i|x) - alpha * log pi(y_l|x)/pi_ref+(y_l|x))``
with ``y_i ~ pi_ref``. What each symbol is here:

- ``y_l``, the negative: the label-false rows of a binary dataset (label-true rows are dropped by
  rule: the method trains on negatives only), or the rejected answer of a pairwise dataset (the
  chosen answer is discarded, which is the point of the method: preferred answers may be noisy).
- ``y_1..y_K``: K responses sampled from the general reference pi_ref for the same prompt, a
  ``samples`` dataset made by ``alignflow generate PROMPTS SAMPLES --model REF -k K`` and
  matched to the negatives by ``prompt_id``. A negative whose prompt has no samples is dropped
  by rule (counted). Samples are drawn once before training (offline, as eq. 53's expectation
  over pi_ref allows: pi_ref does not change).
- pi_ref: the reference model (the initial policy unless another is given); its log-probs of
  the samples are computed once before training.
- pi_ref+: "a reference with more beneficial information, such as the model from the previous
  alignment epoch" (survey). Epoch 1 has no previous epoch, so pi_ref+ is pi_ref there; from
  epoch 2 on it is the policy as it was at the end of the previous epoch: the negatives'
  reference log-probs are recomputed with the live policy when each later epoch begins
  (``PreviousEpochReference``; a run resumed mid-epoch takes the resumed policy).

Examples are pre-tokenized like the other kinds, with response 0 the negative and responses
1..K_b the samples: ``{"prompt_ids", "response_ids": [y_l, y_1, ..., y_K], "ref_logps"}``; the
trainer reads them with ``collators.NegativesCollator`` in one forward pass (packed: the prompt
once for the negative and all its samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from transformers import TrainerCallback

from alignflow.trainers.collators import tokenize_prompts_responses
from alignflow.trainers.precompute import reference_logps

DATA_KINDS = ("binary", "pairwise")


@dataclass
class NegativesCounts:
    """in = used + dropped: label-true rows (binary) and negatives whose prompt has no samples."""

    rows_in: int
    used: int
    dropped_label_true: int
    dropped_no_samples: int
    samples: int  # sample rows read
    samples_per_prompt: tuple[int, int]  # min, max over the used negatives

    def line(self) -> str:
        return (f"nn data: {self.rows_in} rows = {self.used} negatives used + {self.dropped_label_true} label-true "
                f"dropped by rule + {self.dropped_no_samples} without samples for their prompt; "
                f"{self.samples_per_prompt[0]}-{self.samples_per_prompt[1]} samples of pi_ref per negative")


def negatives_table(data: pa.Table, kind: str, samples: pa.Table) -> tuple[pa.Table, NegativesCounts]:
    """``(prompt_id, prompt, negative, samples list<string>)`` rows from a binary or pairwise
    table and a samples table (see module docstring); row order of ``data`` is kept.

    ValueError if ``kind`` is neither, or if no negative has samples."""
    if kind not in DATA_KINDS:
        raise ValueError(f"loss 'nn' takes binary (label-false rows) or pairwise (rejected answers) data, not {kind}")
    for name, table, cols in (("data", data, ("prompt_id", "prompt")), ("samples", samples, ("prompt_id", "response"))):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"nn {name}: no column {', '.join(missing)}")
    rows_in = data.num_rows
    if kind == "binary":
        keep = pc.invert(pc.fill_null(data.column("label"), False))
        negs = data.filter(keep)
        negative = negs.column("response")
    else:
        negs = data
        negative = negs.column("rejected")
    grouped = samples.select(["prompt_id", "response"]).group_by("prompt_id", use_threads=False).aggregate(
        [("response", "list")])
    # Arrow's hash join does not carry list columns: look each negative's prompt up instead
    where = pc.index_in(negs.column("prompt_id"), value_set=grouped.column("prompt_id"))
    joined = pa.table({"prompt_id": negs.column("prompt_id"), "prompt": negs.column("prompt"), "negative": negative,
                       "samples": grouped.column("response_list").take(where)})
    joined = joined.filter(pc.is_valid(where))
    lengths = pc.list_value_length(joined.column("samples"))
    counts = NegativesCounts(rows_in=rows_in, used=joined.num_rows, dropped_label_true=rows_in - negs.num_rows,
                             dropped_no_samples=negs.num_rows - joined.num_rows, samples=samples.num_rows,
                             samples_per_prompt=(int(pc.min(lengths).as_py() or 0), int(pc.max(lengths).as_py() or 0)))
    if joined.num_rows == 0:
        raise ValueError(f"loss 'nn': none of the {negs.num_rows} negatives has samples for its prompt "
                         "(sample the same prompts: alignflow generate PROMPTS SAMPLES --model REF -k K)")
    return joined, counts


def pretokenize_negatives(table: pa.Table, tokenizer, max_length: int | None = None) -> list[dict]:
    """Rows of ``negatives_table`` as examples: response 0 the negative, then its samples."""
    negatives, samples = table.column("negative").to_pylist(), table.column("samples").to_pylist()
    responses = [[n] + list(s) for n, s in zip(negatives, samples)]
    prompt_ids, response_ids = tokenize_prompts_responses(tokenizer, table.column("prompt").to_pylist(), responses,
                                                          max_length)
    return [{"prompt_ids": p, "response_ids": r} for p, r in zip(prompt_ids, response_ids)]


def refresh_negative_reference(model, examples: list[dict], pad_token_id: int, batch_size: int = 32,
                               layout: str = "packed") -> None:
    """pi_ref+ := ``model``: recompute ``ref_logps[0]`` (the negative's) of every example in place."""
    logps, _ = reference_logps(model, [e["prompt_ids"] for e in examples], [[e["response_ids"][0]] for e in examples],
                               pad_token_id, batch_size, layout)
    for ex, lp in zip(examples, logps):
        ex["ref_logps"] = [lp[0]] + list(ex["ref_logps"][1:])


class PreviousEpochReference(TrainerCallback):
    """pi_ref+ of eq. 53 is the policy of the previous epoch: when an epoch begins after training
    has started, the negatives' reference log-probs are recomputed with the live policy."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.refreshes = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            t = self.trainer
            refresh_negative_reference(t.model, t.train_dataset.examples, t.pad_token_id, t.ref_batch_size, t.layout)
            self.refreshes += 1
