"""Coarse steps of the flows: each a plain function and a Prefect task wrapping it.

One task is a stage or a shard (never a row): Prefect's SQLite server stays far from its
locking limits and the per-task cost (~5-7 ms) is noise. Every step

- takes JSON-able arguments (paths as strings, configs as dicts);
- writes its data itself, atomically, through the dataset store, and returns the *path*;
- is idempotent: an output that already exists is returned as is, so a rerun of the same run
  folder after a crash finds the finished steps and shards and skips them; the step runners
  first remove an output that other inputs made (``step_records``: a rerun with a changed
  config makes the changed steps again, never reuses their old outputs). Prefect stores no
  step results (they would be pickles a tampered run folder could use to run code, see
  ``_tasks``); resume rests on the outputs alone.

The plain functions are what ``tests/bench/bench_flow_overhead.py`` calls without Prefect.
Producers and consumers come from ``feedback`` and ``trainers``; this module only composes them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.flows.step_records import StepRecords
from alignflow.schemas.store import is_dataset, read_dataset, read_manifest, write_dataset

# ---------------------------------------------------------------------------------------------
# Backends and judges (composition of feedback/ and trainers/)
# ---------------------------------------------------------------------------------------------

_GENERATORS: dict[tuple, Any] = {}
_GENERATOR_LOCK = threading.Lock()
# In-process backends share one model and torch's global RNG: shards of one process take turns
# (2 CPU cores gain nothing from overlapping them, and seeded sampling stays reproducible).
_MODEL_LOCK = threading.RLock()

# Test hook and extension point: backend name -> factory(model, **options) -> Generator.
BACKEND_FACTORIES: dict[str, Any] = {}

# Code named in a config or a run folder ('module:factory' backends, 'module:function' verifiers)
# is imported only when the user allowed it on the command line (``--allow-plugin SPEC``, which
# sets this variable for the run and its worker processes): a config file or a downloaded run
# folder is data, and must never be able to run code by naming it.
ALLOW_PLUGINS_ENV = "ALIGNFLOW_ALLOW_PLUGINS"


class PluginNotAllowed(ValueError):
    """A config names code to import that the user did not allow with --allow-plugin."""


def allowed_plugins() -> set[str]:
    return {p.strip() for p in os.environ.get(ALLOW_PLUGINS_ENV, "").split(",") if p.strip()}


def check_plugin(spec: str, what: str) -> None:
    if spec not in allowed_plugins():
        raise PluginNotAllowed(f"{what} {spec!r} names Python code to import; alignflow imports such code only when "
                               f"you allow it on the command line: --allow-plugin {spec}")


def load_plugin(spec: str, what: str):
    """The object ``module:attr`` names, once ``check_plugin`` allows it."""
    import importlib

    check_plugin(spec, what)
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'module:name'")
    return getattr(importlib.import_module(module), attr)


class TransientBackendError(RuntimeError):
    """A backend error worth retrying (server overloaded, connection reset, timeout)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failed shard should be retried: network trouble, 429/5xx, timeouts."""
    if isinstance(exc, (TransientBackendError, ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in {"ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "PoolTimeout"}:
        return True
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    return isinstance(status, int) and (status == 429 or status >= 500)


def retry_transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    """Prefect ``retry_condition_fn``: retry only transient backend errors."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify whatever the shard raised
        return is_transient(exc)
    return False


def get_generator(backend: str, model: str, options: dict | None = None):
    """A cached generator of ``backend`` for ``model`` (one per process and configuration).

    ``vllm`` keeps ONE engine per process: asked for another checkpoint of the same architecture,
    the live engine loads its weights in place (no second engine, no restart); any other
    checkpoint shuts the live engine down before the new one starts.
    """
    if backend == "hf":
        _quiet_transformers()
    options = dict(options or {})
    key = (backend, str(model), json.dumps(options, sort_keys=True, default=str))
    with _GENERATOR_LOCK:
        for old in [k for k, g in _GENERATORS.items() if getattr(g, "closed", False)]:
            del _GENERATORS[old]  # an engine shut down to make room for another
        if key in _GENERATORS:
            return _GENERATORS[key]
        if backend == "vllm":
            for other in [k for k in _GENERATORS if k[0] == "vllm"]:
                engine = _GENERATORS.pop(other)
                if other[2] == key[2] and engine.can_load(model):
                    engine.load_weights(model)
                    _GENERATORS[key] = engine
                    return engine
                engine.close()
        _GENERATORS[key] = _make_generator(backend, str(model), options)
        return _GENERATORS[key]


def release_engines() -> None:
    """Give in-process engines' accelerator memory back before training needs it (vLLM sleeps
    or shuts down; its next call wakes it with the weights it is asked for)."""
    with _GENERATOR_LOCK:
        for engine in _GENERATORS.values():
            if hasattr(engine, "release"):
                engine.release()


def _make_generator(backend: str, model: str, options: dict):
    if backend in BACKEND_FACTORIES:
        return BACKEND_FACTORIES[backend](model, **options)
    if ":" in backend:  # a user's own backend: 'module:factory', if allowed on the command line
        return load_plugin(backend, "generation.backend")(model, **options)
    from alignflow.feedback.generation.registry import make_generator

    return make_generator(backend, model, **options)


def _quiet_transformers() -> None:
    """No per-load progress bars in flow output (the CLI shows its own progress)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return
    hf_logging.disable_progress_bar()


def clear_generators() -> None:
    """Forget cached generators (a checkpoint folder was rewritten, or tests); engines shut down."""
    with _GENERATOR_LOCK:
        for engine in _GENERATORS.values():
            if hasattr(engine, "close") and not getattr(engine, "closed", True):
                engine.close()
        _GENERATORS.clear()


def forget_models() -> None:
    """Drop cached in-process models after training (their memory goes back); a released engine
    stays, asleep, to load the next checkpoint's weights in place."""
    with _GENERATOR_LOCK:
        for key in [k for k, g in _GENERATORS.items() if not hasattr(g, "load_weights")]:
            del _GENERATORS[key]


def _backend_options(backend: str, generation: dict) -> dict:
    """Constructor options of a backend from a generation config (``flows.config.GenerationConfig``)."""
    if backend == "hf":
        return {k: v for k, v in {"device": generation.get("device"), "batch_size": generation.get("batch_size")}.items()
                if v is not None}
    if backend == "openai":
        return {k: generation[k] for k in ("base_url", "tokenizer") if generation.get(k)}
    if backend == "vllm":
        options = dict(generation.get("engine") or {})
        if generation.get("tokenizer"):
            options["tokenizer"] = generation["tokenizer"]
        return options
    return {}


def _sampling(generation: dict, seed: int | None):
    from alignflow.schemas.generator import SamplingParams

    return SamplingParams(temperature=float(generation.get("temperature", 1.0)),
                          top_p=float(generation.get("top_p", 1.0)),
                          max_new_tokens=int(generation.get("max_new_tokens", 48)), seed=seed)


def toy_task(task_kwargs: dict | None = None):
    """The toy world's task (prompts and verifier); kwargs as ``ToyTask.config()`` returns them."""
    from alignflow.feedback.toy_task import ToyTask

    kwargs = dict(task_kwargs or {})
    for key in ("operations", "corruption_levels"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    return ToyTask(**kwargs)


def make_judge(judge: dict):
    """A judge of ``feedback.judges`` from a JSON-able spec.

    Spec keys: ``type`` (verifier | pairwise_llm | rubric | reward_model), ``model`` and
    ``backend`` for model judges, ``task`` (toy-task kwargs) or ``verifier`` ('module:function'
    taking (prompt text, response)) for the verifier, which becomes a ``FunctionJudge``.
    """
    from alignflow.feedback import judges

    kind = judge.get("type", "verifier")
    if kind == "verifier":
        spec = judge.get("verifier")
        if spec:
            return judges.FunctionJudge(load_plugin(spec, "verifier"), label=spec)
        return judges.FunctionJudge.from_task(toy_task(judge.get("task")))
    if kind == "reward_model":
        return judges.RewardModelJudge(judge["model"], device=judge.get("device"))
    generator = get_generator(judge.get("backend", "hf"), judge["model"], judge.get("options"))
    if kind == "pairwise_llm":
        return judges.PairwiseJudge(generator)
    if kind == "rubric":
        return judges.RubricJudge(generator)
    raise ValueError(f"unknown judge type {kind!r}")


# ---------------------------------------------------------------------------------------------
# Steps (plain functions)
# ---------------------------------------------------------------------------------------------

def import_prompts(out: str, *, source: str, source_format: str | None = None) -> str:
    """The prompts dataset of ``source``; returns its path.

    A ``prompts`` dataset of the store is used as it is. Any other dataset of the store, or a
    file in any format ``alignflow convert`` reads (``source_format``, its ``--from``; default:
    the dataset's kind, or ``prompts`` for a file with a ``prompt`` column), is converted into one
    at ``out`` by the same conversion code: one row per prompt, ``reference`` holding a gold answer
    where the rows give one, rows refused with reasons in ``<out>-quarantine``.
    """
    source_is_dataset = is_dataset(source)
    kind = read_manifest(source)["kind"] if source_is_dataset else None
    if kind == "prompts" and source_format in (None, "prompts"):
        return source
    from alignflow.feedback.labels import convert_labels_file

    report = convert_labels_file(source, out, source_format or kind or "prompts", "prompts",
                                 quarantine_path=f"{out}-quarantine", flow="import_prompts")
    if report.rows_out == 0:
        raise ValueError(f"{source}: no usable prompts ({report.line()})")
    return out


def prepare_prompts(out: str, *, n: int, seed: int, source: str | None = None, task: dict | None = None,
                    exclude: str | None = None) -> str:
    """Write a ``prompts`` dataset of ``n`` prompts at ``out``; returns its path.

    From the toy task (``source=None``) or sampled (seeded) from a prompts dataset (its
    ``reference`` column, the gold answers, comes along). Prompts whose id occurs in the dataset
    ``exclude`` (the held-out set) are left out.
    """
    if is_dataset(out):
        return out
    if source is None:
        extra = n // 2 + 8  # room for duplicates and excluded held-out prompts (small prompt spaces)
        table = pa.table({"prompt": toy_task(task).prompts(n + extra, seed=seed)})
    else:
        carried = ["reference"] if "reference" in read_manifest(source).get("columns", {}) else []
        table = read_dataset(source, columns=["prompt_id", "prompt", *carried])
        order = np.random.default_rng(seed).permutation(table.num_rows)
        table = table.take(pa.array(order))
    from alignflow.schemas.prompts import normalize_prompt_columns

    table = normalize_prompt_columns(table)
    table = _first_per_prompt(table)
    if exclude:
        held = read_dataset(exclude, columns=["prompt_id"]).column("prompt_id")
        table = table.filter(pc.invert(pc.is_in(table.column("prompt_id"), value_set=held.combine_chunks())))
    table = table.slice(0, n)
    write_dataset(out, table, "prompts", {"flow": "prepare_prompts", "seed": seed, "source": source or "toy_task",
                                          "task": task or {}, "exclude": exclude}, overwrite=True)
    return out


def check_toy_prompts(dataset: str, judge: str = "verifier") -> None:
    """The toy task's verifier scores toy-task prompts only (one user turn starting with one of
    its instructions): a one-line ValueError naming the first other row of ``dataset``."""
    from alignflow.feedback.toy_task import OPERATIONS

    table = read_dataset(dataset, columns=["prompt_id", "prompt"])
    prompts = table.column("prompt").combine_chunks()
    single = pc.fill_null(pc.equal(pc.list_value_length(prompts), 1), False)
    first = pc.struct_field(pc.list_element(pc.if_else(single, prompts, pa.scalar([{"role": "", "content": ""}],
                                                                                     prompts.type)), 0), "content")
    starts = [pc.starts_with(first, op) for op in OPERATIONS]
    toy = pc.and_(single, functools.reduce(pc.or_, starts))
    bad = np.flatnonzero(~pc.fill_null(toy, False).to_numpy(zero_copy_only=False))
    if len(bad):
        row = int(bad[0])
        text = str(pc.list_element(prompts, 0)[row]["content"])[:50] if prompts[row].is_valid else ""
        raise ValueError(f"{dataset}: row {row} (prompt_id {table.column('prompt_id')[row]}): field prompt: "
                         f"{text!r} is not a toy-task prompt, and judge {judge!r} scores the toy task only; "
                         "name a judge for these prompts: reward_model:PATH, pairwise_llm:PATH or rubric:PATH")


def _first_per_prompt(table: pa.Table) -> pa.Table:
    """Rows with a prompt_id seen before dropped (one row per distinct prompt, order kept)."""
    ids = table.column("prompt_id").combine_chunks()
    codes = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    return table.take(pa.array(np.sort(first), pa.int64()))


def shard_count(prompts: str, shard_size: int) -> int:
    """How many shards of ``shard_size`` prompts the prompts dataset makes."""
    return max(1, -(-read_manifest(prompts)["num_rows"] // shard_size))


def shard_seed(seed: int, iteration: int, shard: int) -> int:
    """Seed of one shard: a pure function of run seed, iteration and shard index."""
    return (seed * 1_000_003 + iteration * 10_007 + shard) % (2**31 - 1)


def generate_shard(out: str, *, prompts: str, shard: int, shard_size: int, model: str, backend: str,
                   generation: dict, k: int, seed: int) -> str:
    """Sample ``k`` responses for each prompt of one shard; write a ``samples`` dataset at ``out``."""
    if is_dataset(out):
        return out
    from alignflow.feedback.sampling import sample_table

    table = read_dataset(prompts, columns=["prompt_id", "prompt"]).slice(shard * shard_size, shard_size)
    generator = get_generator(backend, model, _backend_options(backend, generation))
    with _MODEL_LOCK:
        samples = sample_table(table, generator, k, _sampling(generation, seed),
                               batch_size=int(generation.get("batch_size", 64)))
    write_dataset(out, samples, "samples", {"flow": "generate_shard", "model": str(model), "backend": backend,
                                            "shard": shard, "seed": seed, "sampling": generation, "pid": os.getpid(),
                                            "parent_datasets": [prompts]}, overwrite=True)
    return out


def judge_shard(out: str, *, samples: str, judge: dict, seed: int = 0) -> str:
    """Label one shard of samples through the judge interface; write the result at ``out``.

    Pointwise judges (verifier, rubric, reward model) add a ``reward`` column to the samples.
    The pairwise LLM judge labels seeded candidate pairs of each prompt in both orders
    (position-debiased) and writes a ``pairwise`` shard with ``judge_prob`` / ``judge_consistent``.
    """
    if is_dataset(out):
        return out
    from alignflow.feedback.judges.tables import candidate_pairs, label_pairs, score_samples

    table = read_dataset(samples)
    scorer = make_judge(judge)
    provenance = {"flow": "judge_shard", "judge": _judge_provenance(judge), "parent_datasets": [samples]}
    with _MODEL_LOCK:
        if judge.get("type") == "pairwise_llm":
            pairs, _, counts = label_pairs(candidate_pairs(table, judge.get("pairs_per_prompt", 1), seed), scorer)
            write_dataset(out, pairs, "pairwise", {**provenance, "counts": counts}, overwrite=True)
            return out
        scored = score_samples(table, scorer)
    provenance["truncated_to_context"] = int(getattr(scorer, "last_truncated", 0))
    write_dataset(out, scored, "samples", provenance, overwrite=True)
    return out


def _judge_provenance(judge: dict) -> dict:
    return {k: v for k, v in judge.items() if k != "options"}


def build_feedback(out_dir: str, *, shards: Sequence[str], kind: str, min_margin: float = 0.0,
                   provenance: dict | None = None) -> dict:
    """Merge the judged shards into ``samples`` and the ``kind`` dataset; returns paths and stats.

    Rows that fail validation go to a quarantine dataset with reasons; the returned counts
    add up: ``prompts = rows + quarantined + dropped`` (dropped: ties or margins below
    ``min_margin``, which form no pair).
    """
    out = Path(out_dir)
    summary_file = out / "feedback.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    from alignflow.schemas.store import QUARANTINE_KIND
    from alignflow.schemas.validate import validate

    scored = pa.concat_tables([read_dataset(s) for s in shards], promote_options="permissive")
    judged_pairs = read_manifest(shards[0])["kind"] == "pairwise" if shards else False
    if judged_pairs:  # the pairwise LLM judge labelled pairs itself
        if kind != "pairwise":
            raise ValueError(f"a pairwise judge gives pairwise data, not {kind}")
        samples_path, table = None, scored
    else:
        samples_path = write_dataset(out / "samples", scored, "samples",
                                     {"flow": "build_feedback", "parent_datasets": list(shards), **(provenance or {})},
                                     overwrite=True)
        table = preference_table(scored, kind, min_margin)
    checked = validate(table, kind)
    dataset_path = write_dataset(out / kind, checked.valid, kind,
                                 {"flow": "build_feedback", "kind": kind, "min_margin": min_margin,
                                  "parent_datasets": list(shards) if judged_pairs else [str(samples_path)],
                                  **(provenance or {})}, overwrite=True)
    if checked.quarantined.num_rows:
        write_dataset(out / "quarantine", checked.quarantined, QUARANTINE_KIND,
                      {"flow": "build_feedback", "parent_datasets": [str(dataset_path)]}, overwrite=True)
    n_prompts = pc.count_distinct(scored.column("prompt_id")).as_py()
    stats = {
        "samples": str(samples_path) if samples_path else None,
        "dataset": str(dataset_path),
        "kind": kind,
        "prompts": n_prompts,
        "samples_rows": scored.num_rows,
        "rows": checked.valid.num_rows,
        "quarantined": checked.quarantined.num_rows,
        "dropped": (scored.num_rows - table.num_rows) if judged_pairs or kind == "binary"
        else n_prompts - table.num_rows,
        "reward_mean": None if judged_pairs else float(pc.mean(scored.column("reward")).as_py()),
        "length_bias": length_bias(checked.valid, kind),
        "position_consistency": _position_consistency(checked.valid),
    }
    _atomic_json(summary_file, stats)
    return stats


def preference_table(scored: pa.Table, kind: str, min_margin: float = 0.0) -> pa.Table:
    """Samples with a ``reward`` column -> pairwise (best vs worst), listwise (all K) or binary rows.

    Pairwise and listwise come from ``feedback.rejection``; ties (best == worst) form no pair.
    Binary (KTO-style unpaired feedback): a sample is desirable when its reward is above the
    mean reward of its prompt's samples, undesirable when below; samples at the mean are dropped.
    """
    from alignflow.feedback import rejection

    if kind == "pairwise":
        return rejection.best_vs_worst(scored, source="ai", min_margin=min_margin)
    if kind == "listwise":
        return rejection.to_listwise(scored)
    if kind == "binary":
        return binary_table(scored)
    raise ValueError(f"cannot build {kind!r} data from scored samples")


def binary_table(scored: pa.Table) -> pa.Table:
    """Unpaired labels: reward above the prompt's mean reward -> True, below -> False, equal -> dropped."""
    import pandas as pd

    ids = scored.column("prompt_id").to_numpy(zero_copy_only=False)
    reward = scored.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    mean = pd.Series(reward).groupby(ids).transform("mean").to_numpy()
    keep = ~np.isclose(reward, mean, rtol=0.0, atol=1e-12)
    rows = pa.array(np.flatnonzero(keep), pa.int64())
    return scored.select(["prompt_id", "prompt", "response", "reward"]).take(rows).append_column(
        "label", pa.array(reward[keep] > mean[keep], pa.bool_()))


def length_bias(table: pa.Table, kind: str) -> float | None:
    """Correlation of preference with length difference, in [-1, 1] (0 = no length bias).

    Pairwise: each pair counted in both orientations, the correlation of the preference sign
    with len(a) - len(b) is ``mean(d) / sqrt(mean(d**2))`` with ``d = len(chosen) - len(rejected)``.
    Binary: point-biserial correlation of the label with the response length.
    """
    if table.num_rows == 0:
        return None
    if kind == "pairwise":
        d = (pc.utf8_length(table.column("chosen")).to_numpy(zero_copy_only=False).astype(float)
             - pc.utf8_length(table.column("rejected")).to_numpy(zero_copy_only=False).astype(float))
        rms = float(np.sqrt(np.mean(d ** 2)))
        return float(np.mean(d) / rms) if rms > 0 else 0.0
    if kind == "binary":
        length = pc.utf8_length(table.column("response")).to_numpy(zero_copy_only=False).astype(float)
        label = table.column("label").to_numpy(zero_copy_only=False).astype(float)
        if length.std() == 0 or label.std() == 0:
            return 0.0
        return float(np.corrcoef(length, label)[0, 1])
    if kind == "listwise":
        lengths = pc.utf8_length(pc.list_flatten(table.column("responses"))).to_numpy(zero_copy_only=False)
        scores = pc.list_flatten(table.column("scores")).to_numpy(zero_copy_only=False)
        if np.std(lengths) == 0 or np.std(scores) == 0:
            return 0.0
        return float(np.corrcoef(lengths.astype(float), scores)[0, 1])
    return None


def _position_consistency(table: pa.Table) -> float | None:
    """Share of position-consistent judgements (only for judges that score both orders)."""
    if "judge_consistent" not in table.column_names or table.num_rows == 0:
        return None
    return float(pc.mean(table.column("judge_consistent").cast(pa.float64())).as_py())


def precompute_reference(out: str, *, dataset: str, reference: str, batch_size: int = 32) -> str:
    """Copy of ``dataset`` with the reference model's log-prob columns (``ref_*``) at ``out``."""
    if is_dataset(out):
        return out
    from alignflow.trainers.precompute import precompute_reference as precompute

    _quiet_transformers()
    release_engines()
    with _MODEL_LOCK:
        precompute(dataset, reference, output=out, batch_size=batch_size)
    return out


def train_policy(out: str, *, dataset: str, model: str, train: dict, seed: int = 0) -> str:
    """Train ``model`` on ``dataset`` with ``train['loss']``; the checkpoint goes to ``out``.

    With ``num_processes > 1`` the training runs under ``accelerate launch`` (DDP; gloo on
    CPU; ``accelerate_config`` passes DeepSpeed or FSDP settings through). The checkpoint is
    written to ``<out>.partial`` and renamed, so a half-written one is never taken as done; the
    name is fixed, so a rerun after a kill removes what the killed run left there.
    """
    target = Path(out)
    if (target / "config.json").exists():
        return out
    tmp = _fresh_partial(target)
    spec = {"dataset": dataset, "model": model, "output": str(tmp), "train": train, "seed": seed}
    processes = int(train.get("num_processes", 1))
    release_engines()  # the trainer needs the accelerator memory an engine holds
    try:
        if processes > 1:
            launch_distributed(spec, processes, train.get("accelerate_config"))
        else:
            with _MODEL_LOCK:
                run_training(spec)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    forget_models()
    return out


def training_arguments(train: dict, seed: int) -> dict:
    """``TrainingArguments`` fields of a train config."""
    return {
        "learning_rate": float(train.get("learning_rate", 5e-4)),
        "num_train_epochs": float(train.get("epochs", 1.0)),
        "per_device_train_batch_size": int(train.get("batch_size", 16)),
        "gradient_accumulation_steps": int(train.get("gradient_accumulation_steps", 1)),
        "max_steps": int(train.get("max_steps", -1)),
        "seed": int(seed),
    }


def run_training(spec: dict) -> str:
    """Train once in this process (also the body each ``accelerate launch`` process runs).

    Composes ``trainers.collators.pretokenize`` and ``trainers.preference.PreferenceTrainer``
    (a ``transformers.Trainer``: under ``accelerate launch`` it runs DDP by itself). Reference
    log-probs come from the dataset's ``ref_*`` columns when present.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.modeling import context_length

    hf_logging.disable_progress_bar()
    from alignflow.trainers.preference import PreferenceTrainer

    train = spec["train"]
    manifest = read_manifest(spec["dataset"])
    kind = manifest["kind"]
    output = Path(spec["output"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model"])
    examples = pretokenize(read_dataset(spec["dataset"]), kind, tokenizer,
                           train.get("max_length") or context_length(policy))
    args = TrainingArguments(output_dir=str(output / "trainer-state"), report_to="none", save_strategy="no",
                             logging_steps=10, dataloader_num_workers=0, eval_strategy="no",
                             dataloader_pin_memory=False, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                             data_seed=int(spec.get("seed", 0)), **training_arguments(train, spec.get("seed", 0)))
    trainer = PreferenceTrainer(policy, args, examples, kind=kind, loss=train.get("loss", "dpo"),
                                loss_params=dict(train.get("params") or {}), processing_class=tokenizer)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to alignflow_train.json, not stdout
    result = trainer.train()
    trainer.save_model(str(output))  # on the main process only, after all ranks finish
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output))
        shutil.rmtree(output / "trainer-state", ignore_errors=True)
        record = {"dataset": spec["dataset"], "model": spec["model"], "loss": train.get("loss", "dpo"),
                  "loss_params": train.get("params"), "reference": manifest.get("provenance", {}).get("reference"),
                  "world_size": int(args.world_size), "train_loss": result.training_loss,
                  "train_runtime_s": result.metrics.get("train_runtime"), "log_history": trainer.state.log_history}
        (output / "alignflow_train.json").write_text(json.dumps(record, indent=2, default=str))
    return spec["output"]


def launch_distributed(spec: dict, processes: int, accelerate_config: str | None = None) -> None:
    """Run ``run_training(spec)`` in ``processes`` processes with ``accelerate launch``."""
    spec_file = Path(spec["output"] + ".spec.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(_free_port())]
    if accelerate_config:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        # accelerate's multi-process launcher (torchrun underneath); on a machine without CUDA the
        # workers train with use_cpu=True, so accelerate sets up MULTI_CPU with the gloo backend.
        cmd += ["--multi_gpu"]
    cmd += ["-m", "alignflow.flows.train_flow", "--worker", str(spec_file)]
    # The workers import this checkout of alignflow, whatever is installed.
    import alignflow

    root = str(Path(alignflow.__file__).resolve().parents[1])  # the folder that holds the alignflow package
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    spec_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # torchrun ends with a summary of which rank died; the cause is a worker's own report above it
        cause = next((i for i, line in enumerate(lines) if "Traceback" in line or "terminate called" in line), None)
        shown = (lines[cause:cause + 25] + ["..."] if cause is not None else []) + lines[-15:]
        raise RuntimeError(f"accelerate launch failed (exit {proc.returncode}):\n" + "\n".join(shown))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_policy(out: str, *, model: str, initial: str, prompts: str, judge: dict, k: int, temperature: float,
                    max_new_tokens: int, seed: int, backend: str = "hf", generation: dict | None = None) -> dict:
    """Held-out reward and KL to the starting policy; writes ``out`` (JSON) and returns it.

    KL(pi || pi_0) is the Monte-Carlo estimate ``mean_y~pi [log pi(y|x) - log pi_0(y|x)]``
    over the k samples of each held-out prompt, log-probs summed over response tokens.
    """
    target = Path(out)
    if target.exists():
        return json.loads(target.read_text())
    generation = dict(generation or {}, temperature=temperature, max_new_tokens=max_new_tokens)
    options = _backend_options(backend, generation)
    table = read_dataset(prompts, columns=["prompt_id", "prompt"])
    messages = table.column("prompt").to_pylist()
    policy = get_generator(backend, model, options)
    with _MODEL_LOCK:
        outputs = policy.generate(messages, n=k, sampling=_sampling(generation, seed))
        responses = [[g.text for g in o] for o in outputs]
        logp_policy = _score_all(policy, messages, responses)
        logp_initial = _score_all(get_generator(backend, initial, options), messages, responses)
    flat_prompts = pa.array([m for m, rs in zip(messages, responses) for _ in rs])
    flat_responses = [r for rs in responses for r in rs]
    rewards = np.asarray(make_judge(judge).score(flat_prompts.to_pylist(), flat_responses), dtype=np.float64)
    per_prompt = np.asarray(rewards, dtype=np.float64).reshape(len(messages), k).mean(axis=1)  # [P]
    result = {
        "model": str(model),
        "reward": float(np.mean(rewards)),
        "prompt_rewards": [round(float(r), 6) for r in per_prompt],
        "reward_std": float(np.std(rewards)),
        "kl": float(np.mean(logp_policy - logp_initial)),
        "length": float(np.mean([len(r) for r in flat_responses])),
        "n": len(flat_responses),
    }
    if judge.get("type", "verifier") == "verifier" and not judge.get("verifier"):
        texts = [m[-1]["content"] for m in messages for _ in range(k)]
        result["quality"] = float(np.mean(toy_task(judge.get("task")).qualities(texts, flat_responses)))
    _atomic_json(target, result)
    return result


def _score_all(generator, messages: list, responses: list[list[str]]) -> np.ndarray:
    """Summed log-probs of each response, end-of-sequence included, under ``generator``'s model.

    Every backend (hf, vllm, openai with a tokenizer) scores with ``add_eos=True``; a backend
    that cannot is an error, never a silent score without eos (the KL would change with the
    backend)."""
    flat_prompts = [m for m, rs in zip(messages, responses) for _ in rs]
    flat_responses = [r for rs in responses for r in rs]
    if not hasattr(generator, "score_batch"):
        raise TypeError(f"backend {getattr(generator, 'name', type(generator).__name__)!r} has no "
                        "score_batch(prompts, continuations, add_eos=True): it cannot score KL to the start")
    scores = generator.score_batch(flat_prompts, flat_responses, add_eos=True)
    return np.asarray(scores, dtype=np.float64)


def _atomic_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per step output: a fixed name, reused by a rerun
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _fresh_partial(target: Path) -> Path:
    """``<target>.partial``, emptied: where a checkpoint is written before it is renamed into place."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.with_name(tmp.name + ".spec.json").unlink(missing_ok=True)
    return tmp


# ---------------------------------------------------------------------------------------------
# Prefect tasks
# ---------------------------------------------------------------------------------------------

def _tasks():
    """Build the Prefect task objects (imports prefect; called once, lazily).

    No step result is persisted, so nothing in a run folder is ever deserialized by Prefect: its
    result records name their own serializer (pickle included), so a tampered or downloaded run
    folder would run code on resume. Resume needs no result records: every step is idempotent
    on its own outputs (Parquet datasets with manifests, JSON summaries read as plain data), and a
    finished step returns from them at once (``tests/test_hostile.py`` measures a rerun).
    """
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def make(fn, name, **options):
        return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False, **options)

    return {
        "import_prompts": make(import_prompts, "import-prompts"),
        "prepare_prompts": make(prepare_prompts, "prepare-prompts"),
        "generate_shard": make(generate_shard, "generate-shard", retries=3, retry_delay_seconds=[1, 4, 16],
                               retry_condition_fn=retry_transient),
        "judge_shard": make(judge_shard, "judge-shard", retries=3, retry_delay_seconds=[1, 4, 16],
                            retry_condition_fn=retry_transient),
        "build_feedback": make(build_feedback, "build-feedback"),
        "precompute_reference": make(precompute_reference, "precompute-reference"),
        "train_policy": make(train_policy, "train-policy"),
        "evaluate_policy": make(evaluate_policy, "evaluate-policy"),
        "build_world": make(build_world, "build-toy-world"),
        "merge_critiques": make(merge_critiques, "merge-critiques"),
        "sft_policy": make(sft_policy, "constitutional-sft"),
        "critique_shard": make(critique_shard, "critique-revise-shard", retries=3,
                               retry_delay_seconds=[1, 4, 16], retry_condition_fn=retry_transient),
    }


_TASKS: dict | None = None


def prefect_task(name: str, run_dir: str | os.PathLike, **options):
    """The Prefect task of step ``name`` (``run_dir``: the run folder; no results are stored in it)."""
    global _TASKS
    if _TASKS is None:
        _TASKS = _tasks()
    return _TASKS[name].with_options(**options) if options else _TASKS[name]


STEPS = {
    "import_prompts": import_prompts,
    "prepare_prompts": prepare_prompts,
    "generate_shard": generate_shard,
    "judge_shard": judge_shard,
    "build_feedback": build_feedback,
    "precompute_reference": precompute_reference,
    "train_policy": train_policy,
    "evaluate_policy": evaluate_policy,
}


def build_world(out: str, *, seed: int = 0, options: dict | None = None, world: str = "toy") -> dict:
    """Build the embedded ``world`` (``flows.worlds``: toy or bpe) at ``out`` once; returns its
    checkpoint path, task config and stats."""
    summary = Path(out) / "world.json"
    if summary.exists():
        return json.loads(summary.read_text())
    from alignflow.flows.worlds import build_embedded_world

    options = dict(options or {})
    task_kwargs = options.pop("task", None)
    world = build_embedded_world(world, out, seed=seed, task=toy_task(task_kwargs) if task_kwargs else None,
                                 **options)
    task = world.task.config() if hasattr(world.task, "config") else {}
    stats = world.stats if isinstance(getattr(world, "stats", None), dict) else {}
    result = {"path": str(world.path), "task": task, "stats": stats}
    _atomic_json(summary, result)
    return result


def critique_shard(out: str, *, prompts: str, shard: int, shard_size: int, model: str, backend: str,
                   generation: dict, constitution: str | None, rounds: int, seed: int) -> str:
    """Constitutional critique-revision of one shard of prompts; writes a ``critiques`` dataset."""
    if is_dataset(out):
        return out
    from alignflow.feedback.constitutional import critique_revise, load_constitution
    from alignflow.feedback.sampling import sample_table

    table = read_dataset(prompts, columns=["prompt_id", "prompt"]).slice(shard * shard_size, shard_size)
    generator = get_generator(backend, model, _backend_options(backend, generation))
    with _MODEL_LOCK:
        first = sample_table(table, generator, 1, _sampling(generation, seed))
        trace = critique_revise(first, generator, load_constitution(constitution), rounds=rounds, seed=seed,
                                sampling=_sampling(generation, seed + 1))
    write_dataset(out, trace, "critiques", {"flow": "critique_shard", "model": str(model), "shard": shard,
                                            "constitution": constitution or "built-in", "rounds": rounds,
                                            "seed": seed, "parent_datasets": [prompts]}, overwrite=True)
    return out


def merge_critiques(out_dir: str, *, shards: Sequence[str]) -> dict:
    """Merge critique shards into ``critiques`` and the ``sft`` dataset of final revisions."""
    out = Path(out_dir)
    if is_dataset(out / "sft"):
        rows = read_manifest(out / "sft")["num_rows"]
        quarantined = read_manifest(out / "quarantine")["num_rows"] if is_dataset(out / "quarantine") else 0
        return {"critiques": str(out / "critiques"), "sft": str(out / "sft"), "rows": rows, "quarantined": quarantined}
    trace = pa.concat_tables([read_dataset(s) for s in shards], promote_options="permissive")
    write_dataset(out / "critiques", trace, "critiques", {"flow": "critique_revise", "parent_datasets": list(shards)},
                  overwrite=True)
    from alignflow.feedback.constitutional import critiques_to_sft
    from alignflow.schemas.store import QUARANTINE_KIND
    from alignflow.schemas.validate import validate

    checked = validate(critiques_to_sft(trace), "sft")  # e.g. empty revisions are quarantined
    write_dataset(out / "sft", checked.valid, "sft",
                  {"flow": "critique_revise", "parent_datasets": [str(out / "critiques")]}, overwrite=True)
    if checked.quarantined.num_rows:
        write_dataset(out / "quarantine", checked.quarantined, QUARANTINE_KIND,
                      {"flow": "critique_revise", "parent_datasets": [str(out / "critiques")]}, overwrite=True)
    return {"critiques": str(out / "critiques"), "sft": str(out / "sft"), "rows": checked.valid.num_rows,
            "quarantined": checked.quarantined.num_rows}


def sft_policy(out: str, *, dataset: str, model: str, epochs: float = 1.0, seed: int = 0) -> str:
    """Supervised fine-tuning of ``model`` on an ``sft`` dataset (Constitutional SFT stage)."""
    target = Path(out)
    if (target / "config.json").exists():
        return out
    from alignflow.trainers.sft import train_sft

    tmp = _fresh_partial(target)
    release_engines()
    try:
        with _MODEL_LOCK:
            train_sft(model, None, dataset, tmp, num_train_epochs=epochs, seed=seed)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


STEPS.update(build_world=build_world, critique_shard=critique_shard, merge_critiques=merge_critiques,
             sft_policy=sft_policy)


# ---------------------------------------------------------------------------------------------
# Running steps: with Prefect (tasks, futures, cache) or as plain calls (benchmark baseline)
# ---------------------------------------------------------------------------------------------

class ShardsFailed(RuntimeError):
    """Some shards of a stage failed after their retries; the others finished and are kept."""


ProgressFn = Any  # Callable[[str, int, int], None]: (stage, done, total)


class PlainSteps:
    """Run steps as plain function calls, one after another (no Prefect)."""

    uses_prefect = False

    def __init__(self, run_dir: str | os.PathLike, progress: ProgressFn | None = None, **_: Any):
        self.run_dir = str(run_dir)
        self.progress = progress or (lambda stage, done, total: None)
        self.records = StepRecords(run_dir)  # an output made from other inputs is made again

    def call(self, name: str, **kwargs: Any) -> Any:
        self.progress(name, 0, 1)
        self.records.prepare(name, kwargs)
        result = STEPS[name](**kwargs)
        self.progress(name, 1, 1)
        return result

    def map(self, name: str, calls: Sequence[dict]) -> list:
        results = []
        self.progress(name, 0, len(calls))
        for i, kwargs in enumerate(calls):
            self.records.prepare(name, kwargs)
            results.append(STEPS[name](**kwargs))
            self.progress(name, i + 1, len(calls))
        return results

    def table_artifact(self, key: str, rows: list[dict], description: str = "") -> None:
        pass


class PrefectSteps(PlainSteps):
    """Run steps as Prefect tasks (no cache, no stored results: steps resume from their outputs).

    ``map`` submits one task per shard to the flow's task runner and waits for all of them
    before looking at failures, so a failed shard never cancels or hides the others (their
    outputs are kept, and a rerun redoes only what failed).
    """

    uses_prefect = True

    def __init__(self, run_dir: str | os.PathLike, progress: ProgressFn | None = None,
                 retries: int | None = None, retry_delays: Sequence[float] | None = None):
        super().__init__(run_dir, progress)
        self.shard_options: dict[str, Any] = {}
        if retries is not None:
            self.shard_options["retries"] = retries
        if retry_delays is not None:
            self.shard_options["retry_delay_seconds"] = list(retry_delays) or 0

    def _task(self, name: str, sharded: bool = False):
        return prefect_task(name, self.run_dir, **(self.shard_options if sharded else {}))

    def call(self, name: str, **kwargs: Any) -> Any:
        self.progress(name, 0, 1)
        self.records.prepare(name, kwargs)
        result = self._task(name)(**kwargs)
        self.progress(name, 1, 1)
        return result

    def map(self, name: str, calls: Sequence[dict]) -> list:
        task = self._task(name, sharded=True)
        for kwargs in calls:
            self.records.prepare(name, kwargs)
        futures = [task.submit(**kwargs) for kwargs in calls]
        results, failures = [None] * len(futures), []
        self.progress(name, 0, len(futures))
        from prefect.futures import as_completed

        index = {id(f): i for i, f in enumerate(futures)}
        done = 0
        for future in as_completed(futures):
            i = index[id(future)]
            try:
                results[i] = future.result()
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append((i, exc))
            done += 1
            self.progress(name, done, len(futures))
        if failures:
            lines = ", ".join(f"shard {i}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              for i, e in sorted(failures, key=lambda x: x[0]))
            raise ShardsFailed(f"{name}: {len(failures)} of {len(futures)} shards failed ({lines}); "
                               "the others are kept, rerun to retry only these")
        return results

    def table_artifact(self, key: str, rows: list[dict], description: str = "") -> None:
        from prefect.artifacts import create_table_artifact

        key = "".join(c if c.isalnum() else "-" for c in key.lower()).strip("-")
        create_table_artifact(table=rows, key=key, description=description)
