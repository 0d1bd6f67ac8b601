"""``alignflow demo``: build the toy world and print its reward statistics.

(The end-to-end ``alignflow run`` pipeline will join this module.) Heavy imports stay inside
the command bodies so ``alignflow --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.commands.common import console, user_errors

DEFAULT_RUNS = Path("alignflow-runs")


def demo(
    output: Path = typer.Option(None, "--output", "-o",
                                help="Folder for the toy world (default ./alignflow-runs/demo/seed-N)."),
    seed: int = typer.Option(0, "--seed", help="Seed of data, weights and sampling."),
    length_weight: float = typer.Option(0.0, "--length-weight",
                                        help="Share of the reward paid for length (0 = length-neutral)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a finished build is present."),
) -> None:
    """Build the toy world (synthetic task + SFT'd tiny char-level Llama) and show its reward statistics."""
    from rich.table import Table

    from feedback.toy_task import ToyTask
    from flows.toy_world import build_toy_world

    out_dir = output or DEFAULT_RUNS / "demo" / f"seed-{seed}"
    with user_errors():
        task = ToyTask(length_weight=length_weight)
        console.print(f"building the toy world in [bold]{out_dir}[/] (seed {seed}) ...")
        world = build_toy_world(out_dir, seed=seed, task=task, force=force)
    stats = world.stats
    table = Table(title=f"toy world: samples at temperature {stats['temperature']}, "
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
    console.print(f"checkpoint: [bold]{world.path}[/] (AutoModelForCausalLM / AutoTokenizer load it)")
    _show_examples(world)


def _show_examples(world, n_prompts: int = 3, k: int = 4) -> None:
    """A few prompts with K samples each and their rewards."""
    from feedback.generation.hf import HFGenerator
    from schemas.generator import SamplingParams

    prompts = world.task.prompts(n_prompts, seed=world.config.seed + 2000)
    generator = HFGenerator(world.path, device="cpu")
    gens = generator.generate([[{"role": "user", "content": p}] for p in prompts], n=k,
                              sampling=SamplingParams(temperature=1.0, max_new_tokens=24, seed=world.config.seed))
    for prompt, samples in zip(prompts, gens):
        shown = ", ".join(f"{g.text!r} ({world.task.reward(prompt, g.text):.2f})" for g in samples)
        console.print(f"  {prompt!r} -> reference {world.task.reference(prompt)!r}: {shown}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
