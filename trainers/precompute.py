"""Reference log-probs computed once and stored beside the data as ``ref_*`` columns.

Every loss with a reference (DPO and kin, eq. 10-12) needs ``log pi_ref(y | x)`` for each
response. They do not change during training, so they are computed once, written into the
dataset (DESIGN.md: ``ref_chosen_logps``/``ref_rejected_logps`` + ``chosen_tokens``/
``rejected_tokens`` for pairwise, ``ref_logps``/``tokens`` lists for listwise, ``ref_logps``/
``tokens`` and KTO's ``ref_kl_logps`` for binary) through ``schemas.store`` with provenance
(which reference model, its revision and a hash of its weights), and training never loads the
reference model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from alignflow.trainers.logprobs import build_sequence_batch, chunk_by_tokens, resolve_layout, sequence_logps

REF_COLUMNS = {
    "pairwise": ("ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens"),
    "listwise": ("ref_logps", "tokens"),
    "binary": ("ref_logps", "tokens", "ref_kl_logps"),
}


# Padded tokens per reference forward pass (rows x widest row): bounds memory whatever the row
# lengths (a batch of 32 rows of 5k tokens needs tens of GB in attention; 16k tokens, a few hundred MB
# on the toy model).
MAX_BATCH_TOKENS = 16384


def reference_passes(dataset: str | os.PathLike, kind: str) -> int:
    """Forward passes over the rows of a ``kind`` dataset: 2 for binary (KTO's mismatched KL pairs),
    else 1; ValueError for a kind without reference columns."""
    if kind not in REF_COLUMNS:
        raise ValueError(f"{dataset}: kind {kind!r} has no reference columns (pairwise, listwise, binary do)")
    return 2 if kind == "binary" else 1


@torch.inference_mode()
def reference_logps(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[Sequence[int]]],
                    pad_token_id: int, batch_size: int = 32, layout: str = "packed",
                    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
                    progress: Callable[[int], None] | None = None) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-probs and token counts of every response (lists aligned with ``responses``).

    Examples are batched by length (less padding), at most ``batch_size`` examples and
    ``max_batch_tokens`` padded tokens a batch; the model runs in eval mode without grad.
    ``progress(n)`` is called after each batch with its number of examples.
    """
    was_training = model.training
    model.eval()
    layout = resolve_layout(model, layout)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + sum(len(r) for r in responses[i]))
    logps: list[list[float]] = [[] for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    groups = chunk_by_tokens([prompts[i] for i in order], [responses[i] for i in order], layout,
                             max_batch_tokens, batch_size)
    for group in groups:
        idx = [order[j] for j in group]
        batch = build_sequence_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad_token_id, layout)
        lp, tk = sequence_logps(model, batch.to(device))
        lp, tk = lp.double().cpu().tolist(), tk.cpu().tolist()
        for row, i in enumerate(idx):
            k = len(responses[i])
            logps[i], tokens[i] = lp[row][:k], tk[row][:k]
        if progress is not None:
            progress(len(idx))
    model.train(was_training)
    return logps, tokens


def fill_reference_logps(model, examples: list[dict], pad_token_id: int, *, batch_size: int = 32,
                         with_kl: bool = False, layout: str = "packed",
                         max_batch_tokens: int | None = MAX_BATCH_TOKENS,
                         progress: Callable[[int], None] | None = None) -> None:
    """Set ``ref_logps`` (and with ``with_kl`` KTO's ``ref_kl_logps``) of pre-tokenized examples in place.

    ``progress(n)`` after each forward batch of ``n`` examples (``with_kl``: two passes, 2 x len(examples) in all).
    """
    prompts = [e["prompt_ids"] for e in examples]
    logps, _ = reference_logps(model, prompts, [e["response_ids"] for e in examples], pad_token_id, batch_size, layout,
                               max_batch_tokens, progress)
    for ex, lp in zip(examples, logps):
        ex["ref_logps"] = lp
    if with_kl:
        kl, _ = reference_logps(model, prompts, [[e["kl_response_ids"]] for e in examples], pad_token_id,
                                batch_size, layout, max_batch_tokens, progress)
        for ex, lp in zip(examples, kl):
            ex["ref_kl_logps"] = lp[0]


def reference_columns(examples: list[dict], kind: str, tokens: list[list[int]] | None = None) -> dict[str, list]:
    """The ``ref_*`` and token-count columns of ``kind`` from filled examples."""
    counts = tokens if tokens is not None else [[len(r) for r in e["response_ids"]] for e in examples]
    if kind == "pairwise":
        return {"ref_chosen_logps": [e["ref_logps"][0] for e in examples],
                "ref_rejected_logps": [e["ref_logps"][1] for e in examples],
                "chosen_tokens": [c[0] for c in counts], "rejected_tokens": [c[1] for c in counts]}
    if kind == "listwise":
        return {"ref_logps": [list(e["ref_logps"]) for e in examples], "tokens": [list(c) for c in counts]}
    cols = {"ref_logps": [e["ref_logps"][0] for e in examples], "tokens": [c[0] for c in counts]}
    if all("ref_kl_logps" in e for e in examples):
        cols["ref_kl_logps"] = [e["ref_kl_logps"] for e in examples]
    return cols


def model_fingerprint(model_path: str | os.PathLike) -> dict[str, Any]:
    """Which reference model: its path, hub revision if known, and sha256 over its weight files."""
    path = Path(model_path)
    info: dict[str, Any] = {"reference_model": str(model_path)}
    if path.is_dir():
        digest = hashlib.sha256()
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
        for f in files:
            digest.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        info["weights_sha256"] = digest.hexdigest() if files else None
        config = path / "config.json"
        if config.exists():
            info["revision"] = json.loads(config.read_text()).get("_commit_hash")
        parts = path.resolve().parts
        if "snapshots" in parts:  # a hub cache folder: models--org--name/snapshots/<commit>
            info["revision"] = parts[parts.index("snapshots") + 1]
    return info


def add_reference_columns(table, kind: str, model, tokenizer, *, batch_size: int = 32,
                          max_length: int | None = None, layout: str = "packed",
                          max_batch_tokens: int | None = MAX_BATCH_TOKENS):
    """``table`` (pyarrow) with the reference columns of ``kind`` computed by ``model`` (replaced if present)."""
    from alignflow.trainers.collators import pretokenize

    stripped = table.drop_columns([c for c in REF_COLUMNS[kind] if c in table.column_names])
    examples = pretokenize(stripped, kind, tokenizer, max_length)
    return with_reference_columns(stripped, kind, model, tokenizer, examples, batch_size=batch_size, layout=layout,
                                  max_batch_tokens=max_batch_tokens)


def with_reference_columns(table, kind: str, model, tokenizer, examples: list[dict], *, batch_size: int = 32,
                           layout: str = "packed", max_batch_tokens: int | None = MAX_BATCH_TOKENS,
                           progress: Callable[[int], None] | None = None):
    """``table`` (without reference columns) plus those computed on its pre-tokenized ``examples``."""
    import pyarrow as pa

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fill_reference_logps(model, examples, pad, batch_size=batch_size, with_kl=kind == "binary", layout=layout,
                         max_batch_tokens=max_batch_tokens, progress=progress)
    for name, values in reference_columns(examples, kind).items():
        table = table.append_column(name, pa.array(values))
    return table


def precompute_reference(dataset: str | os.PathLike, model_path: str | os.PathLike,
                         output: str | os.PathLike | None = None, *, batch_size: int = 32,
                         max_length: int | None = None, torch_dtype: str | None = None,
                         max_batch_tokens: int | None = MAX_BATCH_TOKENS, bf16: bool = False,
                         progress: Callable[[int], None] | None = None) -> Path:
    """Compute the reference columns of a store dataset with the model at ``model_path``.

    ``bf16``: forward passes under bfloat16 autocast, as ``train --bf16 true`` runs the policy (a
    bf16 run then starts from log-ratios of about 0, and the pass is 2-3x faster on CPUs with
    bf16 units); the sums are still float64. The manifest records it (``autocast``).

    Prompt + response are cut to ``max_length`` tokens (default: the model's context length;
    ``trainers.collators.truncated``), forward passes hold at most ``batch_size`` rows and
    ``max_batch_tokens`` padded tokens. Writes ``output`` (default: the dataset itself, replaced
    atomically) with the manifest's provenance recording the reference model (path, revision,
    weights sha256), the parent dataset and the settings, the number of rows cut included.
    ``progress(n)`` is called after each forward batch of ``n`` rows (binary: twice over the rows,
    the second pass for KTO's mismatched KL pairs). Returns the written folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.schemas.store import read_dataset, read_manifest, write_dataset
    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.modeling import context_length, device_of

    manifest = read_manifest(dataset)
    kind = manifest["kind"]
    reference_passes(dataset, kind)  # a kind without reference columns: ValueError before any loading
    table = read_dataset(dataset)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype) if dtype else \
        AutoModelForCausalLM.from_pretrained(model_path)
    if torch.cuda.is_available():
        model = model.cuda()
    max_length = max_length or context_length(model)
    stripped = table.drop_columns([c for c in REF_COLUMNS[kind] if c in table.column_names])
    examples = pretokenize(stripped, kind, tokenizer, max_length)
    with torch.autocast(device_of(model).type, dtype=torch.bfloat16, enabled=bf16):
        out_table = with_reference_columns(stripped, kind, model, tokenizer, examples, batch_size=batch_size,
                                           max_batch_tokens=max_batch_tokens, progress=progress)
    provenance = dict(manifest.get("provenance", {}))
    parents = list(provenance.get("parent_datasets", []))
    target = Path(output) if output is not None else Path(dataset)
    if target.resolve() != Path(dataset).resolve():
        parents.append(str(dataset))
    provenance.update({
        "parent_datasets": parents,
        "reference": {**model_fingerprint(model_path), "columns": list(REF_COLUMNS[kind]),
                      "max_length": max_length, "truncated_rows": sum(bool(e.get("truncated")) for e in examples),
                      "dtype": str(next(model.parameters()).dtype), "autocast": "bfloat16" if bf16 else None},
    })
    return write_dataset(target, out_table, kind, provenance, overwrite=True)


def reference_of(dataset: str | os.PathLike) -> dict | None:
    """The reference-model record of a dataset's manifest (None if its ref columns were never computed)."""
    from alignflow.schemas.store import read_manifest

    return read_manifest(dataset).get("provenance", {}).get("reference")
