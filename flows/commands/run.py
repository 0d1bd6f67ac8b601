"""``alignflow run``, ``alignflow demo``, ``alignflow serve``: the flows from the command line.

``alignflow demo`` is the main job: it builds the toy world and runs ``align_from_prompts``
(two iterations of DPO, samples labelled by the toy task's verifier through the judge
interface) on the embedded Prefect default, then prints reward and KL per iteration.
Heavy imports (prefect, torch, transformers) stay inside the command bodies so
``alignflow --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alignflow.flows.commands.common import console, escape, fail, user_errors

DEFAULT_RUNS = Path("alignflow-runs")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
ALLOW_PLUGIN_HELP = ("Let the config import this 'module:name' (a generation backend factory or a verifier); "
                     "repeatable. Code named in a config or run folder is never imported otherwise.")


def _quiet_prefect(verbose: bool) -> None:
    """Prefect's INFO lines would interleave with the progress bars; keep warnings and errors."""
    import os

    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        # The embedded server logs its own shutdown hiccups (events still queued at exit).
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")


def _execute(flow: str, config, verbose: bool) -> dict:
    from alignflow.flows.runtime import RichProgress, embedded_environment, run_flow

    _quiet_prefect(verbose)
    embedded_environment()
    console.print(f"[bold]{escape(flow)}[/] -> run folder [bold]{escape(config.output)}[/]", markup=True)
    with RichProgress(console.get()) as progress:
        return run_flow(flow, config, progress=progress)


def run(
    flow: str = typer.Argument(..., help="Flow: align (align_from_prompts), generate_feedback, critique_revise, "
                                         "train, convert_labels."),
    config_file: Path = typer.Option(None, "--config", "-c", help="YAML config of the run (fields: --show-config)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                  help="Override a field: key=value, dotted for nested "
                                                       "(train.params.beta=0.2); repeatable."),
    output: Path = typer.Option(None, "--output", "-o", help="Run folder (an existing one is resumed)."),
    show_config: bool = typer.Option(False, "--show-config", help="Print every field with its default and exit."),
    allow_plugin: Optional[List[str]] = typer.Option(None, "--allow-plugin", help=ALLOW_PLUGIN_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's log lines."),
) -> None:
    """Run a flow from a YAML config; rerunning with the same --output resumes it."""
    from alignflow.flows.config import CONFIGS, dump_config, flow_name, load_config
    from alignflow.flows.runtime import expand_output

    with user_errors():
        name = flow_name(flow)
        if show_config:
            _print_fields(CONFIGS[name])
            return
        config = load_config(name, config_file, list(overrides or []))
        if output is not None:
            config.output = str(output)
        allow_plugins(allow_plugin)
        preflight(config)
        if hasattr(config, "output"):
            config.output = expand_output(config.output, config.name)
            dump_config(config, Path(config.output) / "config.yaml")
    result = _execute(name, config, verbose)
    if name == "align":
        print_align_report(result)
    else:
        _print_result(result)


def allow_plugins(specs: Optional[List[str]]) -> None:
    """Record the plugins the user allowed for this run (and its worker processes)."""
    import os

    from alignflow.flows.tasks import ALLOW_PLUGINS_ENV, allowed_plugins

    if specs:
        os.environ[ALLOW_PLUGINS_ENV] = ",".join(sorted(allowed_plugins() | set(specs)))


def plugin_specs(config) -> list[tuple[str, str]]:
    """(field, 'module:name') of every config field that names code to import."""
    specs = []
    generation = getattr(config, "generation", None)
    if generation is not None and ":" in generation.backend:
        specs.append(("generation.backend", generation.backend))
    if getattr(config, "verifier", None):
        specs.append(("verifier", config.verifier))
    return specs


def preflight(config) -> None:
    """Fail fast, in one line, before Prefect starts: input datasets that are not there, code
    named by the config that the user did not allow (--allow-plugin)."""
    from alignflow.flows.tasks import check_plugin
    from alignflow.schemas.store import is_dataset, read_manifest

    for field, spec in plugin_specs(config):
        check_plugin(spec, field)
    for field in ("prompts", "eval_prompts", "dataset"):
        value = getattr(config, field, None)
        if not value:
            continue
        if Path(value).is_file() and field != "dataset":  # a label file the flow converts to prompts
            continue
        if not Path(value).exists() and not is_dataset(value):
            raise FileNotFoundError(f"{value}: {field} not found")
        read_manifest(value)  # DatasetError names the folder


def demo(
    output: Path = typer.Option(None, "--output", "-o",
                                help="Run folder (default ./alignflow-runs/demo/seed-N, demo-bpe/seed-N for "
                                     "--world bpe; an existing one is resumed)."),
    seed: int = typer.Option(0, "--seed", help="Seed of data, weights, sampling and training."),
    world: str = typer.Option(None, "--world", help="Embedded world to build and align: toy (the default; "
                                                    "char-level tokenizer, tiny Llama) or bpe (byte-level BPE + "
                                                    "ChatML, tiny Qwen2)."),
    model: str = typer.Option(None, "--model", help="Start from this checkpoint instead of an embedded world."),
    backend: str = typer.Option(None, "--backend", help="Generation backend: hf (default), vllm, openai."),
    judge: str = typer.Option(None, "--judge", help="verifier (default: the toy task's reward), pairwise_llm, "
                                                    "rubric, reward_model."),
    prompts: Path = typer.Option(None, "--prompts", help="Prompts dataset (default: the toy task's prompts)."),
    iterations: int = typer.Option(None, "--iterations", help="Iterations (default 2)."),
    length_weight: float = typer.Option(0.0, "--length-weight",
                                        help="Share of the toy reward paid for length (0 = length-neutral)."),
    config_file: Path = typer.Option(None, "--config", "-c", help="Another config instead of flows/configs/demo.yaml."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a field: key=value."),
    allow_plugin: Optional[List[str]] = typer.Option(None, "--allow-plugin", help=ALLOW_PLUGIN_HELP),
    fresh: bool = typer.Option(False, "--fresh", "--force",
                               help="Delete the run folder first: rebuild the world, rerun every step."),
    world_only: bool = typer.Option(False, "--world-only",
                                    help="Only build the world in --output and show its reward statistics."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's log lines."),
) -> None:
    """The main job: build the toy world and align it with two iterations of DPO (reward should rise)."""
    import shutil

    from alignflow.flows.config import dump_config, load_config
    from alignflow.flows.runtime import expand_output
    from alignflow.flows.worlds import WORLDS

    if world is not None and world not in WORLDS:
        fail(f"--world {world!r}: expected one of {', '.join(WORLDS)}")
    default_output = DEFAULT_RUNS / ("demo" if world in (None, "toy") else f"demo-{world}") / f"seed-{seed}"
    if world_only:
        _world_only(output or default_output, seed, length_weight, fresh, world or "toy")
        return
    sets = [f"seed={seed}"] + ([f"world={world}"] if world else [])
    if model:
        sets.append(f"model={model}")
    if backend:
        sets.append(f"generation.backend={backend}")
    if judge:
        sets.append(f"feedback.judge={judge}")
    if prompts:
        sets.append(f"prompts={prompts}")
    if iterations:
        sets.append(f"iterations={iterations}")
    if length_weight:
        sets.append(f"toy_world.task.length_weight={length_weight}")
    with user_errors():
        config = load_config("align", config_file or DEMO_CONFIG, sets + list(overrides or []))
        allow_plugins(allow_plugin)
        preflight(config)
        config.output = expand_output(str(output or default_output), config.name)
        run_dir = Path(config.output)
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        elif (run_dir / "report.json").exists():
            console.print("[dim]this run folder holds a finished run: its steps are reused "
                          "(--fresh starts over)[/]", markup=True)
        dump_config(config, run_dir / "config.yaml")
    result = _execute("align", config, verbose)
    print_align_report(result)


def _world_only(out_dir: Path, seed: int, length_weight: float, force: bool, name: str = "toy") -> None:
    """An embedded world alone (data + SFT), with its reward statistics and a few samples."""
    from rich.table import Table

    from alignflow.feedback.toy_task import ToyTask
    from alignflow.flows.worlds import build_embedded_world

    with user_errors():
        task = ToyTask(length_weight=length_weight)
        console.print(f"building the {escape(name)} world in [bold]{escape(out_dir)}[/] (seed {seed}) ...", markup=True)
        world = build_embedded_world(name, out_dir, seed=seed, task=task, force=force)
    stats = world.stats
    table = Table(title=f"{name} world: samples at temperature {stats['temperature']}, "
                        f"K={stats['k']} per prompt, {stats['n_prompts']} held-out prompts")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    rows = [
        ("mean reward", f"{stats['mean_reward']:.3f}"),
        ("mean quality (length-free)", f"{stats['mean_quality']:.3f}"),
        ("exact answers", f"{stats['exact_match']:.1%}"),
        ("within-prompt reward std", f"{stats['within_prompt_std']:.3f}"),
        ("prompts with reward spread", f"{stats['frac_prompts_with_spread']:.1%}"),
        ("mean best - worst of K", f"{stats['mean_max_minus_min']:.3f}"),
        ("mean response length (chars)", f"{stats['mean_length']:.1f}"),
        ("build seconds (data + SFT)", f"{stats.get('build_seconds', float('nan')):.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"checkpoint: [bold]{escape(world.path)}[/] (AutoModelForCausalLM / AutoTokenizer load it)", markup=True)
    _show_examples(world)


def _show_examples(world, n_prompts: int = 3, k: int = 4) -> None:
    """A few prompts with K samples each and their rewards."""
    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.schemas.generator import SamplingParams

    prompts = world.task.prompts(n_prompts, seed=world.config.seed + 2000)
    generator = HFGenerator(world.path, device="cpu")
    gens = generator.generate([[{"role": "user", "content": p}] for p in prompts], n=k,
                              sampling=SamplingParams(temperature=1.0, max_new_tokens=24, seed=world.config.seed))
    for prompt, samples in zip(prompts, gens):
        shown = ", ".join(f"{g.text!r} ({world.task.reward(prompt, g.text):.2f})" for g in samples)
        console.print(f"  {prompt!r} -> reference {world.task.reference(prompt)!r}: {shown}", highlight=False)


def print_align_report(report: dict) -> None:
    """Rich table of held-out reward and KL per iteration, then where the outputs are."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{report['name']}: {report['loss']} on {report['kind']} data, judge {report['judge']}")
    for column, justify in (("iteration", "right"), ("held-out reward", "right"), ("quality", "right"),
                            ("KL to start", "right"), ("mean length", "right"), ("pairs / rows", "right"),
                            ("reward of its samples", "right")):
        table.add_column(column, justify=justify)
    previous = None
    for h in report["history"]:
        arrow = "" if previous is None else (" [green]↑[/]" if h["reward"] > previous else " [red]↓[/]")
        previous = h["reward"]
        table.add_row(str(h["iteration"]), Text.from_markup(f"{h['reward']:.3f}{arrow}"),
                      "" if h.get("quality") is None else f"{h['quality']:.3f}", f"{h['kl']:.3f}",
                      f"{h['length']:.1f}", str(h.get("rows", "")),
                      "" if h.get("reward_before") is None else f"{h['reward_before']:.3f}")
    console.print(table)
    world = report.get("world_stats")
    if world:
        console.print(f"{report.get('world') or 'toy'} world (the SFT start): reward {world['mean_reward']:.3f} "
                      f"on its own held-out prompts, exact answers {world['exact_match']:.1%}, "
                      f"built in {world.get('build_seconds', 0):.0f} s")
    console.print(f"stop: {report['stop_reason']}")
    run = Path(report["run_dir"])
    console.print(f"run folder: [bold]{escape(run)}[/]", markup=True)
    for h in report["history"][1:]:
        console.print(f"  iteration {h['iteration']}: dataset {h['dataset']}  checkpoint {h['model']}")
    console.print(f"  plot: {report['plot']}   report: {run / 'report.json'}")


def _print_result(result) -> None:
    import json

    console.print_json(json.dumps(result, default=str))


def _print_fields(model) -> None:
    from rich.table import Table

    from alignflow.flows.config import describe

    table = Table(title=f"{model.__name__} fields", show_lines=False)
    table.add_column("field")
    table.add_column("default")
    table.add_column("description", overflow="fold")
    for name, default, text in describe(model):
        table.add_row(name, default, text)
    console.print(table)


def serve(
    file: Path = typer.Option(Path("prefect.yaml"), "--file", "-f", help="prefect.yaml with the deployments."),
    names: Optional[List[str]] = typer.Option(None, "--name", "-n", help="Serve only these deployments."),
    list_only: bool = typer.Option(False, "--list", help="List the deployments and their schedules, then exit."),
) -> None:
    """Serve prefect.yaml's deployments (nightly generate_feedback included) from this process.

    Needs a running Prefect server (``prefect server start``, PREFECT_API_URL set): schedules
    live on the server. With --list only the file is read.
    """
    import os

    from rich.table import Table

    from alignflow.flows.runtime import embedded_environment, load_deployments

    embedded_environment()
    with user_errors():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file")
        deployments = load_deployments(file, list(names or []) or None)
    table = Table(title=f"deployments in {file}")
    table.add_column("name")
    table.add_column("flow")
    table.add_column("schedule")
    for dep in deployments:
        sched = ", ".join(f"cron {s.schedule.cron} {s.schedule.timezone}" for s in (dep.schedules or [])
                          if hasattr(s.schedule, "cron")) or "on demand"
        table.add_row(dep.name, dep.flow_name, sched)
    console.print(table)
    if list_only:
        return
    if not os.environ.get("PREFECT_API_URL"):
        fail("serving schedules needs a persistent server: run `prefect server start` and set PREFECT_API_URL "
             "(or use --list)")
    from prefect import serve as prefect_serve

    prefect_serve(*deployments)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("demo")(demo)
    app.command("serve")(serve)
