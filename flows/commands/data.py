"""``alignflow inspect``, ``alignflow validate`` and ``alignflow report``: look at a dataset of the store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from alignflow.flows.commands.common import arrow_memory_pool, console, escape, fail, user_errors


def inspect(
    dataset: Path = typer.Argument(..., help="Dataset folder (Parquet shards + _manifest.json)."),
    rows: int = typer.Option(3, "--rows", "-n", help="How many rows to show."),
) -> None:
    """Show a dataset's kind, row count, schema, provenance and a few rows."""
    from rich.table import Table

    from alignflow.schemas.store import read_dataset, verify_dataset

    with user_errors():
        manifest = verify_dataset(dataset)
        head = read_dataset(dataset, verify=False).slice(0, rows)
    console.print(f"[bold]{escape(dataset)}[/]  kind=[cyan]{escape(manifest['kind'])}[/]  rows={manifest['num_rows']}  "
                  f"shards={len(manifest['shards'])}  schema v{manifest['schema_version']}", markup=True)
    schema = Table(title="columns", show_header=True)
    schema.add_column("name")
    schema.add_column("type")
    for name, typ in manifest.get("columns", {}).items():
        schema.add_row(name, typ)
    console.print(schema)
    console.print("[bold]provenance[/]", escape(json.dumps(manifest.get("provenance", {}), indent=2, default=str)),
                  markup=True)
    sample = Table(title=f"first {head.num_rows} rows", show_lines=True)
    for name in head.column_names:
        sample.add_column(name, overflow="fold", max_width=60)
    for record in head.to_pylist():
        sample.add_row(*[_short(record[c]) for c in head.column_names])
    console.print(sample)


def _short(value, limit: int = 240) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validate(
    dataset: Path = typer.Argument(..., help="Dataset folder to check."),
    quarantine: Path = typer.Option(None, "--quarantine", help="Write rows that fail as a quarantine dataset here."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the --quarantine folder if it holds a quarantine dataset."),
) -> None:
    """Check shards (regular files, checksums, row counts), files the manifest does not list, and every
    row against the kind's schema; exact duplicate rows are counted. Exit 1 if anything fails."""
    from alignflow.schemas.store import (
        QUARANTINE_KIND,
        check_separate,
        check_target,
        read_dataset,
        unlisted_files,
        verify_dataset,
        write_dataset,
    )
    from alignflow.schemas.validate import duplicate_rows
    from alignflow.schemas.validate import validate as validate_rows

    with user_errors():
        if quarantine is not None:
            check_separate(quarantine, [dataset], what="quarantine")
            check_target(quarantine, QUARANTINE_KIND, overwrite)
        manifest = verify_dataset(dataset)
        if manifest["kind"] == QUARANTINE_KIND:
            fail(f"{dataset}: is a quarantine dataset; nothing to validate")
        table = read_dataset(dataset, verify=False)
        result = validate_rows(table, manifest["kind"])
        duplicates = int(duplicate_rows(table).sum())
        extra = unlisted_files(dataset)
    console.print(f"{dataset}: checksums and row counts ok; {result.summary()}; "
                  f"{duplicates} exact duplicate rows (kept)")
    seen_as_data = [name for name in extra if not name.startswith(("_", "."))]
    if extra:
        console.print(f"  {dataset}: files the manifest does not list: {', '.join(extra[:10])}"
                      + (" (other readers take them as data)" if seen_as_data else ""))
    if result.quarantined.num_rows:
        for row in result.quarantined.slice(0, 5).to_pylist():
            console.print(f"  {dataset}: row {row['row']}: {row['reason']}")
        if quarantine is not None:
            with user_errors():
                write_dataset(quarantine, result.quarantined, QUARANTINE_KIND,
                              {"flow": "validate", "parent_datasets": [str(dataset)]}, overwrite=overwrite)
            console.print(f"quarantined rows written to {quarantine}")
    if result.quarantined.num_rows or seen_as_data:
        raise typer.Exit(1)


def report(
    dataset: Path = typer.Argument(..., help="Dataset folder (any kind, a quarantine dataset included)."),
    output: Path = typer.Option(None, "--output", "-o", help="HTML file to write (default: <DATASET>.report.html beside it)."),
    quarantine: Path = typer.Option(None, "--quarantine", help="Quarantine dataset to show (default: one found beside DATASET)."),
    max_rows: int = typer.Option(1_000_000, "--max-rows", help="Summarise at most this many rows (shards sampled past it)."),
    examples: int = typer.Option(3, "--examples", help="Rows shown as chat."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shard sample and the examples."),
) -> None:
    """Write one self-contained HTML page (no script, nothing fetched) that shows a dataset: accounting,
    quarantine reasons, length / score / margin / judge distributions, ties, sources, example rows as chat."""
    arrow_memory_pool()
    from alignflow.flows.report import build_report

    with user_errors():
        result = build_report(dataset, output, quarantine=quarantine, max_rows=max_rows, examples=examples, seed=seed)
    sample = f"; {result.sampled.note}" if result.sampled.note else ""
    shown = f"; quarantine: {result.quarantine}" if result.quarantine else ""
    console.print(f"wrote {result.path} ({result.kind}, {result.rows:,} rows{shown}{sample})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(validate)
    app.command()(report)
