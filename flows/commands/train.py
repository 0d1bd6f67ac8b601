"""``alignflow train`` and ``alignflow precompute-ref``: offline preference training.

``alignflow train DATASET --model PATH --loss NAME [--param k=v ...] --output DIR`` takes every
field of ``transformers.TrainingArguments`` as an extra option, the way transformers' and TRL's
CLIs do (``--per_device_train_batch_size 8 --num_train_epochs 1 --learning_rate 5e-6``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from alignflow.flows.commands.common import console, escape, model_argument, progress_bar, user_errors

# Our defaults where TrainingArguments' would waste time on a laptop run; any option overrides.
FAST_DEFAULTS = {
    "report_to": "none",
    "save_strategy": "no",  # the final model is always saved to --output
    "logging_steps": "10",
    "dataloader_num_workers": "0",
    "eval_strategy": "no",
    "dataloader_pin_memory": "false",
}


# `--loss tdpo1|tdpo2`: the two TDPO variants (eq. 28 as written; the TDPO paper's stop-gradient
# form) are the registry's `tdpo` with its `variant` parameter.
LOSS_ALIASES = {"tdpo1": ("tdpo", {"variant": "tdpo1"}), "tdpo2": ("tdpo", {"variant": "tdpo2"})}


def resolve_loss_alias(loss: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(registry name, params)`` of a ``--loss`` value; an alias's fixed parameters may not be overridden."""
    if loss not in LOSS_ALIASES:
        return loss, params
    name, fixed = LOSS_ALIASES[loss]
    clash = {k for k in fixed if k in params and params[k] != fixed[k]}
    if clash:
        raise ValueError(f"--loss {loss} fixes {', '.join(f'{k}={fixed[k]!r}' for k in sorted(clash))}; "
                         f"drop --param {', '.join(sorted(clash))} or use --loss {name}")
    return name, {**params, **fixed}


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` with v read as JSON when it parses (numbers, true/false, null), else a string."""
    if "=" not in text:
        raise ValueError(f"--param {text!r}: expected key=value")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def training_arguments(extra: List[str], output: Path):
    """``TrainingArguments`` from extra CLI options (HfArgumentParser), with FAST_DEFAULTS."""
    from transformers import HfArgumentParser, TrainingArguments

    given = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in extra if a.startswith("--")}
    argv = list(extra)
    for key, value in FAST_DEFAULTS.items():
        if key not in given:
            argv += [f"--{key}", value]
    if "output_dir" not in given:
        argv += ["--output_dir", str(output)]
    if "use_cpu" not in given:
        import torch

        if not torch.cuda.is_available():  # bf16/fp16 autocast on a CPU-only machine needs use_cpu
            argv += ["--use_cpu", "true"]
    parser = HfArgumentParser(TrainingArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    except SystemExit:
        raise ValueError(f"unrecognised training option(s) in: {' '.join(extra)} "
                         "(options are the fields of transformers.TrainingArguments)") from None
    return args


def train(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="Pairwise, listwise or binary dataset folder."),
    model: str = typer.Option(..., "--model", help="Policy checkpoint (folder or hub id); also the reference unless --ref-model."),
    loss: str = typer.Option("dpo", "--loss", help="Loss name of trainers.losses (dpo, ipo, simpo, kto, lipo, "
                             "tdpo1, tdpo2, cringe, nn, ...)."),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Loss parameter key=value (repeatable), e.g. beta=0.1."),
    output: Path = typer.Option(..., "--output", help="Where the trained checkpoint goes."),
    ref_model: Optional[str] = typer.Option(None, "--ref-model", help="Reference model for absent ref columns "
                                            "(default: the initial policy); tdpo: the reference loaded for training."),
    samples: Optional[Path] = typer.Option(None, "--samples", help="nn: samples dataset of K responses per prompt "
                                           "from the reference (alignflow generate PROMPTS SAMPLES --model REF -k K)."),
    layout: str = typer.Option("packed", "--layout", help="packed: each prompt computed once for all its responses; plain: one row per response."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Cut prompt+response to this many tokens (default: the model's context length)."),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", help="Run a batch over this many padded tokens in chunks, each recomputed in backward (same gradient, bounded memory)."),
    sdpo_stages: int = typer.Option(1, "--sdpo-stages", help="sDPO (survey 3.3.7): train in this many chunks, each stage's result the next reference."),
) -> None:
    """Train a policy with any loss of trainers.losses: per-sequence ones, and token-level tdpo1/tdpo2
    (reference loaded for training), cringe (binary or pairwise) and nn (with --samples).

    Every transformers.TrainingArguments field is an extra option, e.g.
    --per_device_train_batch_size 8 --num_train_epochs 1 --learning_rate 5e-6 --bf16 true.
    """
    import os

    with user_errors():
        from alignflow.trainers.losses import resolve_params

        params = dict(parse_param(p) for p in (param or []))
        loss, params = resolve_loss_alias(loss, params)
        resolve_params(loss, params)  # unknown loss / parameter -> one line, before heavy imports run
        if layout not in ("packed", "plain"):
            raise ValueError(f"--layout {layout!r}: expected packed or plain")
        positive("--max-length", max_length)
        positive("--max-batch-tokens", max_batch_tokens)
        model = model_argument(model)
        if ref_model is not None:
            ref_model = model_argument(ref_model, "--ref-model")
        from alignflow.schemas.store import read_dataset, read_manifest

        manifest = read_manifest(dataset)
        kind = manifest["kind"]
        if manifest["num_rows"] == 0:
            raise ValueError(f"{dataset}: the dataset has no rows; nothing to train on")
        if loss == "dro":  # DRO-V trains a value network beside the policy: its own trainer
            if kind != "binary":
                raise ValueError(f"loss 'dro' takes binary data (a reward or label per response), the dataset is {kind}")
            return _train_dro_v(dataset, model, params, training_arguments(ctx.args, output), output)
        from alignflow.trainers.preference import TOKEN_LEVEL, loss_kind

        loss_kind(loss, kind)
        if loss == "nn" and samples is None:
            raise ValueError("loss 'nn' needs --samples: K responses per prompt sampled from the reference "
                             "(alignflow generate PROMPTS SAMPLES --model REF -k K)")
        if samples is not None and loss != "nn":
            raise ValueError(f"--samples is for loss nn (its K samples of the reference), not {loss}")
        if loss in TOKEN_LEVEL and sdpo_stages > 1:
            raise ValueError(f"--sdpo-stages trains per-sequence losses; loss {loss!r} is token-level")
        args = training_arguments(ctx.args, output)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.modeling import context_length
    from alignflow.trainers.preference import PreferenceTrainer

    if not os.environ.get("OMP_NUM_THREADS"):  # a user's thread setting wins; else every core we may run on
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with user_errors(OSError):
        tokenizer = AutoTokenizer.from_pretrained(model)
        policy = AutoModelForCausalLM.from_pretrained(model)
        reference = None
        if ref_model is not None:
            reference = AutoModelForCausalLM.from_pretrained(ref_model)
        if max_length is None:
            limits = [n for n in (context_length(policy), reference is not None and context_length(reference)) if n]
            max_length = min(limits) if limits else None
        if loss == "nn":
            examples, nn_counts, sampler = _negatives_examples(dataset, kind, samples, tokenizer, max_length)
            kind = "negatives"
            if not _same_model(sampler, ref_model or model):  # eq. 53's expectation is over y_i ~ pi_ref
                console.print(f"[yellow]warning:[/] the samples of {escape(samples)} were generated by {escape(sampler)}, "
                              f"the reference is {escape(ref_model or model)}: eq. 53 assumes samples of the reference",
                              markup=True)
        else:
            examples = pretokenize(read_dataset(dataset), kind, tokenizer, max_length)
        had_ref = bool(examples) and all("ref_logps" in e for e in examples)
        cut = sum(bool(e.get("truncated")) for e in examples)
        if sdpo_stages > 1:
            return _train_sdpo(policy, tokenizer, args, examples, kind, loss, params, layout, sdpo_stages, output,
                               dataset, model)
        trainer = PreferenceTrainer(policy, args, examples, kind=kind, loss=loss, loss_params=params,
                                    processing_class=tokenizer, layout=layout, ref_model=reference,
                                    max_batch_tokens=max_batch_tokens)
    ref_record = manifest.get("provenance", {}).get("reference")
    if trainer.ref_model is not None:  # tdpo
        used = {"reference_model": ref_model or model, "computed": "live: loaded for training (per-token KL)"}
        source = f"{ref_model or model}, loaded for training (TDPO's per-token KL needs its distributions)"
    elif loss == "nn":
        used = {"reference_model": ref_model or model, "reference_plus": "pi_ref in epoch 1, then the policy "
                "at the end of the previous epoch", "samples": str(samples), "samples_model": sampler,
                "counts": nn_counts.__dict__}
        source = (f"pi_ref {ref_model or model} for the samples of {samples} (computed once); pi_ref+ for the "
                  f"negatives: pi_ref in epoch 1, then the previous epoch's policy; {nn_counts.line()}")
    elif not trainer.needs_ref:
        source, used = "none (reference-free loss)", None
    elif had_ref:
        used = ref_record or {"reference_model": "unrecorded (ref columns without manifest record)"}
        source = f"ref columns of {dataset} ({used.get('reference_model')})"
    else:
        used = {"reference_model": ref_model or model, "computed": "once, in memory, before training"}
        source = f"computed once from {ref_model or model}"
    console.print(f"train: {len(examples)} {kind} rows, loss={loss} {params or ''}, reference: {source}, "
                  f"layout={trainer.layout}")
    if cut:
        console.print(f"train: {cut} of {len(examples)} rows cut to {max_length} tokens of prompt + response "
                      "(--max-length; the prompt keeps its end, responses their start)")
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(str(output))
    tokenizer.save_pretrained(str(output))
    record = {
        "dataset": str(dataset), "model": model, "loss": loss, "loss_params": {k: repr(v) for k, v in params.items()},
        "reference": used, "max_length": max_length, "truncated_rows": cut,
        "train_runtime_s": result.metrics.get("train_runtime"), "train_loss": result.training_loss,
        "log_history": trainer.state.log_history,
    }
    (Path(output) / "alignflow_train.json").write_text(json.dumps(record, indent=2, default=str))
    console.print(f"train: done in {result.metrics.get('train_runtime', 0):.1f} s, loss {result.training_loss:.4f}; "
                  f"checkpoint in {output}")


def _negatives_examples(dataset: Path, kind: str, samples: Path, tokenizer, max_length: int | None):
    """``nn``: the data's negatives joined with the samples of the reference (trainers.negatives)."""
    from alignflow.schemas.store import read_dataset, read_manifest
    from alignflow.trainers.negatives import negatives_table, pretokenize_negatives

    manifest = read_manifest(samples)
    if manifest["kind"] != "samples":
        raise ValueError(f"{samples}: --samples takes a samples dataset (alignflow generate), not {manifest['kind']}")
    table, counts = negatives_table(read_dataset(dataset), kind, read_dataset(samples))
    sampler = manifest.get("provenance", {}).get("models", {}).get("policy", {}).get("model")
    return pretokenize_negatives(table, tokenizer, max_length), counts, sampler


def _same_model(a: str | None, b: str) -> bool:
    return a is None or a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _train_dro_v(dataset: Path, model: str, params: dict, args, output: Path) -> None:
    """``--loss dro``: offline DRO-V (survey eq. 37-39) on scored single responses; the policy goes
    to OUTPUT, the value network to OUTPUT/value_network.pt. TrainingArguments' learning_rate,
    num_train_epochs, per_device_train_batch_size, max_grad_norm and seed apply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.schemas.store import read_dataset
    from alignflow.trainers.online.dro_v import DROVConfig, train_dro_v, trajectories_from_table

    with user_errors(OSError):
        rows = trajectories_from_table(read_dataset(dataset))
        tokenizer = AutoTokenizer.from_pretrained(model)
        policy = AutoModelForCausalLM.from_pretrained(model)
    cfg = DROVConfig(beta=float(params.get("beta", 1.0)), lr=args.learning_rate, epochs=max(1, int(args.num_train_epochs)),
                     batch_size=args.per_device_train_batch_size, max_grad_norm=args.max_grad_norm, seed=args.seed)
    console.print(f"train: DRO-V on {len(rows)} scored responses, beta={cfg.beta}, reference: {model} (computed once)")
    policy, value_net, report = train_dro_v(policy, tokenizer, cfg, trajectories=rows)
    Path(output).mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    torch.save(value_net.state_dict(), Path(output) / "value_network.pt")
    record = {"dataset": str(dataset), "model": model, "loss": "dro", "method": "dro-v", "config": repr(cfg),
              "reference": {"reference_model": model, "computed": "once, in memory, before training"},
              "train_runtime_s": report.wall_s, "log_history": report.history}
    (Path(output) / "alignflow_train.json").write_text(json.dumps(record, indent=2, default=str))
    last = report.history[-1] if report.history else {}
    console.print(f"train: DRO-V done in {report.wall_s:.1f} s, eq. 37 loss {last.get('dro_loss', float('nan')):.4f}; "
                  f"checkpoint in {output}")


def _train_sdpo(policy, tokenizer, args, examples, kind, loss, params, layout, stages, output, dataset, model) -> None:
    from alignflow.trainers.sdpo import train_sdpo

    console.print(f"train: sDPO, {len(examples)} {kind} rows in {stages} stages, loss={loss} {params or ''}; "
                  "each stage's reference is the previous stage's policy (ref columns recomputed per stage)")
    records = train_sdpo(policy, args, examples, kind=kind, stages=stages, loss=loss, loss_params=params,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                         layout=layout, processing_class=tokenizer)
    Path(output).mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    for r in records:
        r.pop("ref_logps")
    record = {"dataset": str(dataset), "model": model, "loss": loss, "loss_params": {k: repr(v) for k, v in params.items()},
              "sdpo_stages": records, "reference": {"reference_model": f"{model}, then the policy after each stage"}}
    (Path(output) / "alignflow_train.json").write_text(json.dumps(record, indent=2, default=str))
    console.print(f"train: sDPO done, stage losses {[round(r['train_loss'], 4) for r in records]}; checkpoint in {output}")


def precompute_ref(
    dataset: Path = typer.Argument(..., help="Pairwise, listwise or binary dataset folder."),
    model: str = typer.Option(..., "--model", help="Reference model (folder or hub id)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write here (default: replace DATASET atomically)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per forward pass."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Cut prompt+response to this many tokens (as in train; default: the model's context length)."),
    max_batch_tokens: int = typer.Option(16384, "--max-batch-tokens", help="Padded tokens per forward pass at most (bounds memory on long rows)."),
    bf16: bool = typer.Option(False, "--bf16", help="Forward passes under bfloat16 autocast, as `train --bf16 true` runs "
                              "the policy (faster; the manifest records it)."),
) -> None:
    """Compute reference log-probs once and store them as ref_* columns (manifest records the model)."""
    with user_errors(OSError):
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: must be at least 1")
        positive("--max-length", max_length)
        positive("--max-batch-tokens", max_batch_tokens)
        model = model_argument(model)
        from alignflow.schemas.store import read_manifest
        from alignflow.trainers.precompute import precompute_reference, reference_of, reference_passes

        manifest = read_manifest(dataset)
        total = reference_passes(dataset, manifest["kind"]) * manifest["num_rows"]
        with progress_bar("reference log-probs", total) as advance:
            path = precompute_reference(dataset, model, output, batch_size=batch_size, max_length=max_length,
                                        max_batch_tokens=max_batch_tokens, bf16=bf16, progress=advance)
        record = reference_of(path)
    console.print(f"precompute-ref: wrote reference columns to {path} "
                  f"(reference {record['reference_model']}, weights sha256 {str(record.get('weights_sha256'))[:12]})")
    if record.get("truncated_rows"):
        console.print(f"precompute-ref: {record['truncated_rows']} rows cut to {record['max_length']} tokens of "
                      "prompt + response (--max-length; train cuts them the same way)")


def positive(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{option} {value}: must be at least 1")


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train)
    app.command("precompute-ref")(precompute_ref)
