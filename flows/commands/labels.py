"""``alignflow formats`` and ``alignflow convert``: human labels between formats and kinds."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import typer

from alignflow.flows.commands.common import arrow_memory_pool, arrow_without_pandas, console, user_errors


def formats() -> None:
    """List the label formats: what each holds, import/export, ties."""
    from rich.table import Table

    from alignflow.feedback.labels.formats import FORMATS

    table = Table(title="label formats (--from / --to)")
    for name in ("format", "kind", "import", "export", "ties", "holds"):
        table.add_column(name, overflow="fold")
    for fmt in FORMATS.values():
        table.add_row(fmt.name, fmt.kind, "yes" if fmt.read else "-", "yes" if fmt.export else "-",
                      "yes" if fmt.ties else "-", fmt.holds)
    console.print(table)
    console.print("files: .jsonl .json .jsonl.gz .parquet .csv .xlsx (read); .jsonl .json .jsonl.gz .parquet .csv "
                  "(write); canonical kinds go to a dataset folder unless OUT has a file extension")
    console.print("limits: JSON nested at most 64 levels; a text value at most 16 MiB (--max-field-mb), a record 4 "
                  "times that; pairs get source = the format's labeller (human, ai) or none where the file does not say")


def convert(
    source: Path = typer.Argument(..., help="Input label file (or a dataset folder for the canonical kinds)."),
    out: Path = typer.Argument(..., help="Output: a dataset folder (canonical kinds) or a file (.jsonl, .json, .parquet, .gz, .csv)."),
    from_format: str = typer.Option(..., "--from", help="Input format (see `alignflow formats`)."),
    to_format: str = typer.Option(..., "--to", help="Output format or kind: pairwise, listwise, binary, sft, trl-preference, ..."),
    strategy: str = typer.Option("all-pairs", "--strategy", help="listwise -> pairwise: all-pairs, best-vs-worst, best-vs-rest, adjacent."),
    ties: str = typer.Option("drop", "--ties", help="drop: ties are dropped by rule; keep: kept in listwise/binary outputs."),
    aspect: str = typer.Option(None, "--aspect", help="Rating aspect, 'mean' or a mix 'a=0.7,b=0.3'; pku: helpfulness|safety|is_safe; graded-pairwise: acceptable."),
    aggregate: str = typer.Option("majority", "--aggregate", help="Several annotators per item: majority or mean."),
    threshold: float = typer.Option(None, "--threshold", help="listwise -> binary: score >= threshold is desirable (default: top/bottom k)."),
    top_k: int = typer.Option(1, "--top-k", help="listwise -> binary: k best desirable, k worst undesirable."),
    style: str = typer.Option(None, "--style", help="trl exports: standard, conversational or implicit (default: by the "
                              "prompts); llamafactory: sharegpt, alpaca or v1."),
    fields: str = typer.Option(None, "--fields", help="The input format's own field options, name=value pairs: "
                               "llamafactory as dataset_info.json (messages=, chosen=, role_tag=, user_tag=, ...), "
                               "axolotl-chat_template as its config (field_messages=, field_chosen=, role=, content=, "
                               "roles.user=human|user, ...)."),
    multi_turn: str = typer.Option("quarantine", "--multi-turn", help="arena battles whose earlier answers differ: "
                                   "quarantine, or whole (one pair of whole conversations; see `alignflow formats`)."),
    max_field_mb: float = typer.Option(16.0, "--max-field-mb", help="Largest text value read (MiB); a JSON record "
                                       "may be 4 times that. Larger ones are an error naming the row."),
    quarantine: Path = typer.Option(None, "--quarantine", help="Write refused rows (row, reason, record) as a quarantine dataset here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT / the quarantine if they hold a dataset of the same kind (or OUT is an export file); anything else there is never replaced."),
) -> None:
    """Convert labels between formats and kinds; prints read = written + quarantined + dropped-by-rule.

    A killed conversion to a dataset folder resumes from its finished shards when run again with the same arguments."""
    arrow_memory_pool()
    with arrow_without_pandas():
        from alignflow.feedback.labels import LabelsError, Options, convert_labels_file

        with user_errors(LabelsError), _progress() as show:
            report = convert_labels_file(source, out, from_format, to_format,
                                         Options(strategy=strategy, ties=ties, aspect=aspect, aggregate=aggregate,
                                                 threshold=threshold, top_k=top_k, style=style, fields=fields,
                                                 multi_turn=multi_turn, max_field_mb=max_field_mb),
                                         quarantine_path=quarantine, progress=show, overwrite=overwrite)
    # plain lines: paths and the file's own field names are printed as they are (no rich markup)
    typer.echo(report.line())
    for line in report.details():
        typer.echo(line)
    typer.echo(f"wrote {report.output}" + (f"; quarantine: {report.quarantine_path}" if report.quarantine_path else ""))


@contextlib.contextmanager
def _progress() -> Iterator:
    """A live line on a terminal (records read, of how many where known; rows written); nothing
    in logs and pipes, where the final accounting line says it all (and rich's progress module,
    a tenth of a second of start-up, is not imported)."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]converting"), BarColumn(), TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                  console=console.get(), transient=True) as bar:
        task = bar.add_task("convert", total=None, counts="")

        def show(report, total_rows) -> None:
            of = f" of {total_rows:,}" if total_rows else ""
            bar.update(task, completed=report.read, total=total_rows,
                       counts=f"{report.read:,}{of} records read, {report.rows_out:,} rows out")

        yield show


def register(app: typer.Typer) -> None:
    app.command()(formats)
    app.command()(convert)
