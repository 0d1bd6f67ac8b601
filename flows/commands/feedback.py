"""``alignflow generate | judge | critique | rejection-sample``: AI feedback over store datasets.

Each verb reads a dataset of the store, writes a new one (atomic, with provenance: models,
judge, constitution, seed, parent datasets; never API keys) and shows a rich progress bar.
Heavy imports (torch, transformers) happen inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from alignflow.flows.commands.common import console, fail, progress_bar, user_errors

BACKEND_HELP = "Generation backend: hf (transformers, in process), vllm (in-process engine), openai (any OpenAI-compatible server)."
MODEL_HELP = "Checkpoint folder (hf, vllm) or the server's model name (openai)."
CONTEXT_HELP = ("openai: the served model's context in tokens, where the server does not report it in /v1/models "
                "(vLLM does); prompts are fitted to it (texts cut by a counted rule), never refused mid-run.")


def _generator(backend: str, model: str, base_url: Optional[str], batch_size: int, device: Optional[str],
               max_concurrency: int, tokenizer: Optional[str] = None, context_length: Optional[int] = None):
    from alignflow.feedback.generation.registry import BACKENDS, make_generator

    if backend not in BACKENDS:
        fail(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "hf":
        if not Path(model).exists():
            fail(f"{model}: no such checkpoint folder")
        return make_generator("hf", model, device=device, batch_size=batch_size)
    if backend == "openai":
        return make_generator("openai", model, base_url=base_url, max_concurrency=max_concurrency,
                              tokenizer=tokenizer or None, context_length=context_length)
    return make_generator("vllm", model)


def _sampling(temperature: float, top_p: float, max_new_tokens: int, seed: int):
    from alignflow.schemas.generator import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)


def generate(
    prompts: Path = typer.Argument(..., help="Input dataset of kind prompts (or any kind with a prompt column)."),
    out: Path = typer.Argument(..., help="Output samples dataset."),
    backend: str = typer.Option("hf", "--backend", help=BACKEND_HELP),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    k: int = typer.Option(4, "--k", "-k", min=1, help="Samples per prompt."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(128, help="Longest response in tokens."),
    seed: int = typer.Option(0, help="Sampling seed (same seed, same samples)."),
    batch_size: int = typer.Option(64, help="Prompts per generate call."),
    device: Optional[str] = typer.Option(None, help="hf: cpu, cuda, ... (default: cuda if available)."),
    base_url: Optional[str] = typer.Option(None, help="openai: server URL, e.g. http://127.0.0.1:8000/v1 (key from ALIGNFLOW_API_KEY / OPENAI_API_KEY)."),
    max_concurrency: int = typer.Option(8, help="openai: requests in flight at most."),
    context_length: Optional[int] = typer.Option(None, "--context-length", help=CONTEXT_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing output dataset."),
) -> None:
    """Sample K responses per prompt: prompts -> samples."""
    from alignflow.feedback.sampling import sample_dataset
    from alignflow.schemas.store import read_manifest

    with user_errors(ImportError):
        n = read_manifest(prompts)["num_rows"]
        gen = _generator(backend, model, base_url, batch_size, device, max_concurrency, context_length=context_length)
        with progress_bar(f"generate x{k}", n) as advance:
            path = sample_dataset(prompts, out, gen, k, _sampling(temperature, top_p, max_new_tokens, seed),
                                  batch_size=batch_size, overwrite=overwrite, progress=advance)
    console.print(f"{n} prompts -> {n * k} samples written to {path}")


JUDGES = ("pairwise", "rubric", "listwise", "reward-model", "toy-task")


def judge(
    dataset: Path = typer.Argument(..., help="samples (to label) or pairwise (to check) dataset."),
    out: Path = typer.Argument(..., help="Output dataset."),
    judge_kind: str = typer.Option("pairwise", "--judge", help=f"One of: {', '.join(JUDGES)}."),
    backend: str = typer.Option("hf", "--backend", help=BACKEND_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP + " For reward-model: the classifier checkpoint."),
    mode: str = typer.Option("auto", help="LLM judges: logprobs, generate (parse a verdict) or auto."),
    cot: bool = typer.Option(False, help="LLM judges: write a rationale first (two passes)."),
    tie_band: float = typer.Option(0.05, help="pairwise: |p - 0.5| at most this is a tie."),
    pairs_per_prompt: int = typer.Option(1, help="pairwise on samples: candidate pairs per prompt."),
    permutations: int = typer.Option(4, help="listwise: orders averaged over."),
    seed: int = typer.Option(0, help="Seed for pair selection and permutations."),
    batch_size: int = typer.Option(64, help="Rows per forward pass / request batch."),
    device: Optional[str] = typer.Option(None, help="hf / reward-model: cpu, cuda, ..."),
    base_url: Optional[str] = typer.Option(None, help="openai: server URL."),
    max_concurrency: int = typer.Option(8, help="openai: requests in flight at most."),
    tokenizer: Optional[str] = typer.Option(None, help="openai: the served model's tokenizer (folder or name). "
                                            "Its chat template lets log-prob judging score any answer text "
                                            "through /completions echo (vLLM serve); without it only "
                                            "single-token answers are read."),
    context_length: Optional[int] = typer.Option(None, "--context-length", help=CONTEXT_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing output dataset."),
) -> None:
    """Label data with a judge. samples + pairwise judge -> pairwise (AI labels, position debiased);
    samples + rubric / reward-model / toy-task -> samples with reward; samples + listwise ->
    listwise; pairwise + pairwise judge -> the same pairs with judge_prob, judge_consistent and a
    report (position consistency, agreement with the existing labels, length bias)."""
    from alignflow.feedback.judges import metrics
    from alignflow.feedback.judges import tables as jt
    from alignflow.feedback.sampling import generator_provenance
    from alignflow.schemas.store import read_dataset, read_manifest, write_dataset

    if judge_kind not in JUDGES:
        fail(f"--judge must be one of {', '.join(JUDGES)}, not {judge_kind!r}")
    with user_errors(ImportError):
        manifest = read_manifest(dataset)
        kind = manifest["kind"]
        if kind not in ("samples", "pairwise"):
            fail(f"{dataset}: kind {kind}; judge reads samples or pairwise datasets")
        if kind == "pairwise" and judge_kind != "pairwise":
            fail(f"{dataset}: a pairwise dataset is checked with --judge pairwise")
        table = read_dataset(dataset)
        prov = {"flow": "judge", "seed": seed, "parent_datasets": [str(dataset)]}
        judge_obj = _make_judge(judge_kind, backend, model, mode, cot, tie_band, permutations, seed, batch_size,
                                device, base_url, max_concurrency, tokenizer, context_length)
        prov["judge"] = judge_obj.config()
        if judge_kind in ("pairwise", "rubric", "listwise") and hasattr(judge_obj, "generator"):
            prov["models"] = {"judge": generator_provenance(judge_obj.generator)}
        if kind == "pairwise":
            with progress_bar("judge (both orders)", 2 * table.num_rows) as advance:
                labelled, result = jt.judge_pairwise_table(table, judge_obj, progress=advance)
            report = _pairwise_report(result, table, metrics)
            path = write_dataset(out, labelled, "pairwise", dict(prov, report=report), overwrite=overwrite)
        elif judge_kind == "pairwise":
            cands = jt.candidate_pairs(table, pairs_per_prompt, seed)
            with progress_bar("judge (both orders)", 2 * cands.num_rows) as advance:
                labelled, result, counts = jt.label_pairs(cands, judge_obj, progress=advance)
            report = dict(_pairwise_report(result, None, metrics), **counts)
            path = write_dataset(out, labelled, "pairwise", dict(prov, report=report), overwrite=overwrite)
        elif judge_kind == "listwise":
            with console.status("ranking"):
                labelled = jt.rank_samples(table, judge_obj)
            report = {"prompts": labelled.num_rows, "method": judge_obj.last_method,
                      "truncated_to_context": judge_obj.last_truncated}
            path = write_dataset(out, labelled, "listwise", dict(prov, report=report), overwrite=overwrite)
        else:
            with console.status(f"scoring {table.num_rows} samples"):
                labelled = jt.score_samples(table, judge_obj)
            r = labelled.column("reward").to_numpy()
            report = {"samples": int(len(r)), "mean_reward": float(r.mean()) if len(r) else None,
                      "truncated_to_context": getattr(judge_obj, "last_truncated", 0)}
            path = write_dataset(out, labelled, "samples", dict(prov, report=report), overwrite=overwrite)
    console.print(json.dumps(report, indent=1, default=str))
    console.print(f"written to {path}")


def _pairwise_report(result, pairs, metrics) -> dict:
    report = result.summary()
    report["win_rate_first"] = metrics.win_rate(result.judge_prob, result.tie_band)
    if pairs is not None:  # existing labels: chosen is the labelled winner
        report["agreement_with_labels"] = metrics.agreement(result.judge_prob, [1.0] * len(result.judge_prob),
                                                            result.tie_band)
        lens_c = [len(s) for s in pairs.column("chosen").to_pylist()]
        lens_r = [len(s) for s in pairs.column("rejected").to_pylist()]
        report["length_bias"] = metrics.length_bias(result.judge_prob, lens_c, lens_r)
    return report


def _make_judge(judge_kind, backend, model, mode, cot, tie_band, permutations, seed, batch_size, device,
                base_url, max_concurrency, tokenizer=None, context_length=None):
    from alignflow.feedback import judges

    if judge_kind == "toy-task":
        from alignflow.feedback.toy_task import ToyTask

        return judges.FunctionJudge.from_task(ToyTask())
    if model is None:
        fail(f"--judge {judge_kind} needs --model")
    if judge_kind == "reward-model":
        if not Path(model).exists():
            fail(f"{model}: no such checkpoint folder")
        return judges.RewardModelJudge(model, device=device, batch_size=batch_size)
    gen = _generator(backend, model, base_url, batch_size, device, max_concurrency, tokenizer, context_length)
    if judge_kind == "pairwise":
        return judges.PairwiseJudge(gen, mode=mode, cot=cot, tie_band=tie_band, batch_size=batch_size)
    if judge_kind == "rubric":
        return judges.RubricJudge(gen, mode=mode, cot=cot, batch_size=batch_size)
    return judges.ListwiseJudge(gen, n_permutations=permutations, mode=mode, seed=seed, batch_size=batch_size)


def critique(
    dataset: Path = typer.Argument(..., help="samples or sft dataset (prompt + response)."),
    out_dir: Path = typer.Argument(..., help="Folder for the critiques, sft and pairwise datasets."),
    backend: str = typer.Option("hf", "--backend", help=BACKEND_HELP),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    constitution: Optional[Path] = typer.Option(None, help="Constitution YAML (default: the built-in one)."),
    rounds: int = typer.Option(1, min=1, help="Critique-revision rounds per response."),
    temperature: float = typer.Option(0.7, help="Sampling temperature of critiques and revisions."),
    max_new_tokens: int = typer.Option(128, help="Longest critique / revision in tokens."),
    seed: int = typer.Option(0, help="Seeds principle sampling and generation."),
    batch_size: int = typer.Option(64),
    device: Optional[str] = typer.Option(None),
    base_url: Optional[str] = typer.Option(None, help="openai: server URL."),
    max_concurrency: int = typer.Option(8),
    context_length: Optional[int] = typer.Option(None, "--context-length", help=CONTEXT_HELP),
    overwrite: bool = typer.Option(False),
) -> None:
    """Constitutional AI critique-revision: writes critiques (trace), sft (final revisions) and
    pairwise (revision over original)."""
    from alignflow.feedback.constitutional import critique_revise_dataset, load_constitution
    from alignflow.schemas.store import read_manifest

    with user_errors(ImportError):
        const = load_constitution(constitution)
        n = read_manifest(dataset)["num_rows"]
        gen = _generator(backend, model, base_url, batch_size, device, max_concurrency, context_length=context_length)
        with progress_bar(f"critique-revise x{rounds}", n * rounds) as advance:
            paths = critique_revise_dataset(dataset, out_dir, gen, const, rounds, seed,
                                            _sampling(temperature, 1.0, max_new_tokens, seed),
                                            batch_size=batch_size, overwrite=overwrite, progress=advance)
    for kind, path in paths.items():
        console.print(f"{kind}: {read_manifest(path)['num_rows']} rows -> {path}")


METHODS = ("best-of-n", "best-vs-worst", "margin", "listwise", "rso")


def rejection_sample(
    samples: Path = typer.Argument(..., help="samples dataset; with a reward column, or scored with --judge."),
    out: Path = typer.Argument(..., help="Output dataset (sft, pairwise or listwise by method)."),
    method: str = typer.Option("best-vs-worst", help=f"One of: {', '.join(METHODS)}."),
    reward: str = typer.Option("reward", help="Reward column to read."),
    judge_kind: Optional[str] = typer.Option(None, "--judge", help="Score first with: toy-task, rubric or reward-model."),
    model: Optional[str] = typer.Option(None, "--model", help="Model of the scoring judge."),
    backend: str = typer.Option("hf", "--backend", help=BACKEND_HELP),
    min_margin: float = typer.Option(0.0, help="margin / best-vs-worst: smallest reward gap kept."),
    max_pairs: Optional[int] = typer.Option(None, help="margin: pairs per prompt at most."),
    beta: float = typer.Option(0.5, help="rso: selectiveness beta of eq. 4."),
    m: int = typer.Option(4, help="rso: responses accepted per prompt."),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None),
    overwrite: bool = typer.Option(False),
) -> None:
    """Best-of-n -> sft; best-vs-worst / margin / RSO (eq. 4) -> pairwise; full lists -> listwise."""
    from alignflow.feedback import rejection
    from alignflow.feedback.judges import tables as jt
    from alignflow.schemas.store import read_dataset, read_manifest, write_dataset

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    with user_errors(ImportError):
        if read_manifest(samples)["kind"] != "samples":
            fail(f"{samples}: rejection-sample reads a samples dataset")
        table = read_dataset(samples)
        prov = {"flow": "rejection-sample", "method": method, "seed": seed, "parent_datasets": [str(samples)]}
        if judge_kind is not None:
            scorer = _make_judge(judge_kind, backend, model, "auto", False, 0.05, 1, seed, 64, device, None, 8)
            with console.status(f"scoring {table.num_rows} samples"):
                table = jt.score_samples(table, scorer, reward)
            prov["judge"] = scorer.config()
        if reward not in table.column_names:
            fail(f"{samples}: no {reward!r} column; score first (--judge toy-task|rubric|reward-model)")
        source = "rule" if judge_kind == "toy-task" else "model"
        if method == "best-of-n":
            result, kind = rejection.best_of_n(table, reward), "sft"
        elif method == "best-vs-worst":
            result, kind = rejection.best_vs_worst(table, reward, source, min_margin), "pairwise"
        elif method == "margin":
            result, kind = rejection.margin_pairs(table, min_margin, reward, max_pairs, source), "pairwise"
        elif method == "listwise":
            result, kind = rejection.to_listwise(table, reward), "listwise"
        else:
            result, kind = rejection.rso_pairs(table, m, beta, reward, seed, source), "pairwise"
            prov.update(beta=beta, m=m)
        path = write_dataset(out, result, kind, prov, overwrite=overwrite)
    console.print(f"{table.num_rows} samples -> {result.num_rows} {kind} rows written to {path}")


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(judge)
    app.command()(critique)
    app.command("rejection-sample")(rejection_sample)
