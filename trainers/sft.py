"""Supervised fine-tuning on (prompt, response) pairs, built on ``transformers.Trainer``.

Loss (survey 3.1; DESIGN's ``sft`` row): the mean per-token negative log-likelihood of the
response tokens of each example, averaged over the batch::

    loss = mean_b [ -(1 / |y_b|) * sum_{t in y_b} log p(y_b,t | x_b, y_b,<t) ]

where ``y_b`` is the response followed by the end-of-sequence token (the chat template closes an
assistant turn with it) and the prompt tokens carry no loss. Every example weighs the same
whatever its length (the per-example ``-a_w`` of DESIGN, not a token mean over the batch).

Examples are tokenized once before training (the chat template per example inside the loop
would double a CPU run); the collator only pads.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

IGNORE_INDEX = -100


def _as_messages(prompt: Any) -> list[dict]:
    """A plain string becomes one user turn; a message list passes through."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def tokenize_sft_example(tokenizer, prompt: Any, response: str, max_length: int | None = None) -> dict:
    """Token ids of chat(prompt) + response + eos, with labels -100 on the prompt part.

    Returns ``{"input_ids": list[int], "labels": list[int]}`` of equal length. The prompt is
    rendered with the chat template and ``add_generation_prompt=True``; the response ids follow,
    then ``eos`` (what the template appends after an assistant turn).
    """
    messages = _as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:  # a base model without a template: contents joined by blank lines (as the hf generator)
        prompt_ids = tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_sft_examples(tokenizer, examples: Iterable[tuple[Any, str]], max_length: int | None = None) -> list[dict]:
    """Pre-tokenize all examples; drops examples whose response was cut away entirely."""
    rows = [tokenize_sft_example(tokenizer, p, r, max_length) for p, r in examples]
    return [row for row in rows if any(label != IGNORE_INDEX for label in row["labels"])]


@dataclass
class PadCollator:
    """Right-pads pre-tokenized rows into ``input_ids``, ``attention_mask``, ``labels`` [B, T]."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sft_loss(logits, labels):
    """Mean over examples of the mean per-token NLL on labelled (response) tokens.

    logits: [B, T, V]; labels: [B, T] with -100 where no loss. Position t predicts token t+1.
    Returns a scalar tensor.
    """
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")  # [B, T-1]
    per_example = (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_example.mean()


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """Temporarily set torch's intra-op CPU threads (process-wide; restored on exit)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make_trainer_class():
    from transformers import Trainer

    class SFTTrainer(Trainer):
        """``Trainer`` whose loss is ``sft_loss`` (per-example mean NLL on response tokens).

        The loss is a plain mean over the micro-batch, so the Trainer must divide it by the
        gradient-accumulation steps; a model whose forward takes ``**kwargs`` would otherwise
        make the Trainer assume the loss is already scaled (and sum G micro-batch means).
        """

        loss_is_scaled_for_ga = False  # transformers >= 5

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # older releases decide scaling from this

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            loss = sft_loss(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

    return SFTTrainer


def read_sft_dataset(path: str | Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, response) pairs from an ``sft`` (or ``samples``/``binary``) dataset of the store."""
    from alignflow.schemas.store import read_dataset

    table = read_dataset(Path(path))
    if "response" not in table.column_names:
        raise ValueError(f"{path}: dataset has no 'response' column")
    return list(zip(table.column("prompt").to_pylist(), table.column("response").to_pylist()))


def train_sft(model, tokenizer, examples, output_dir: str | Path, *, max_length: int | None = None,
              save: bool = True, quiet: bool = False, num_threads: int | str | None = "auto",
              **training_args: Any) -> Path:
    """Fine-tune ``model`` on ``examples`` and save the result as a checkpoint in ``output_dir``.

    Args:
        model: a ``PreTrainedModel`` or a checkpoint path (loaded with AutoModelForCausalLM).
        tokenizer: a tokenizer with a chat template, or None to load it from the model path.
        examples: (prompt, response) pairs (prompt: text or message list), or the path of an
            ``sft`` dataset of the store.
        output_dir: where the final checkpoint (weights, config, tokenizer) is written.
        max_length: truncate longer sequences (None: keep all).
        save: write the checkpoint (False: only train ``model`` in place).
        quiet: print no training log lines.
        num_threads: torch CPU threads while training on the CPU (restored afterwards). "auto":
            1 for a model under 20 M parameters (no slower for such a model, immune to OpenMP
            spinning on a busy machine, one float summation order), else torch's setting.
        **training_args: forwarded to ``transformers.TrainingArguments`` (e.g. num_train_epochs,
            per_device_train_batch_size, learning_rate, seed, use_cpu, max_steps).

    Returns the output folder. The trained model is also left in ``model`` when one was passed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    output_dir = Path(output_dir)
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model)
    if tokenizer is None:
        raise ValueError("train_sft needs a tokenizer when given a model object")
    if isinstance(examples, (str, Path)):
        examples = read_sft_dataset(examples)
    rows = tokenize_sft_examples(tokenizer, examples, max_length)
    if not rows:
        raise ValueError("train_sft: no examples with response tokens")

    defaults = dict(
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        num_train_epochs=1,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )
    defaults.update(training_args)
    args = TrainingArguments(output_dir=str(output_dir / "trainer-state"), **defaults)
    trainer = _make_trainer_class()(model=model, args=args, train_dataset=rows,
                                    data_collator=PadCollator(tokenizer.pad_token_id))
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    on_cpu = training_args.get("use_cpu", False) or not torch.cuda.is_available()
    if num_threads == "auto":
        num_threads = 1 if sum(p.numel() for p in model.parameters()) < 20_000_000 else None
    with _cpu_threads(num_threads if on_cpu else None):
        result = trainer.train()
    model.eval()
    state_dir = output_dir / "trainer-state"
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()  # nothing saved there (save_strategy "no")
    if save:
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "sft_metrics.json").write_text(json.dumps(result.metrics, indent=2, default=float))
    return output_dir
