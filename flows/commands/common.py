"""Helpers shared by CLI commands: one-line errors with exit code 2, a rich console."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Iterator, NoReturn

import typer


class _Console:
    """A rich Console made on first use: rich's import (25 ms) is left to commands that print
    through it (a conversion prints plain lines with ``typer.echo``)."""

    def __init__(self, **options):
        self._options, self._console = options, None

    def get(self):
        """The rich Console itself (for rich objects that take one)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.get(), name)

    def __setattr__(self, name: str, value) -> None:  # e.g. ``console.width = 300`` sets the Console's
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.get(), name, value)


# Plain text unless a call asks for markup: paths, field names and rows from files print as they are
# (rich markup would eat "[x]" in a path). Calls with markup escape what they interpolate (``escape``).
console = _Console(soft_wrap=True, markup=False)  # long paths stay on one line (greppable)
err_console = _Console(stderr=True, markup=False)


def escape(text: object) -> str:
    """``text`` shown literally inside a rich markup string."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (no traceback)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator:
    """A rich progress bar of ``total`` items on the console; yields ``advance(n=1)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console.get(), transient=False) as bar:
        task = bar.add_task(escape(label), total=total)
        yield lambda n=1: bar.advance(task, n)


def arrow_memory_pool() -> None:
    """Arrow buffers from jemalloc in this process (Linux wheels have it; call before pyarrow is
    imported, which reads the choice once). A conversion allocates a few hundred MB per batch in
    one thread and frees it in another (the writer); Arrow's default mimalloc spent twice the
    system time on that (Nectar job, 840,000 pairs: 0.9-1.0 s against 0.45 s) and more memory.
    A user's own ARROW_DEFAULT_MEMORY_POOL wins."""
    if sys.platform.startswith("linux") and "pyarrow" not in sys.modules:
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")


# Set by the ``alignflow`` entry point (cli.main): this process runs one command and exits.
# False where commands run inside another program (typer's CliRunner in tests, a notebook).
OWNS_PROCESS = False


def arrow_without_pandas() -> contextlib.AbstractContextManager:
    """pandas left unimported unless the command uses it (schemas/pandas_free.py: pyarrow would
    import it, 0.15-0.25 s and 35-40 MB of a short conversion), where the command owns its process."""
    if not OWNS_PROCESS:
        return contextlib.nullcontext()
    from alignflow.schemas.pandas_free import arrow_without_pandas

    return arrow_without_pandas()


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn expected errors (bad files, bad data, bad options) into a one-line exit 2."""
    from alignflow.schemas.store import DatasetError

    try:
        yield
    except (DatasetError, FileNotFoundError, ValueError, KeyError, *extra) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(text)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def model_argument(model: str, option: str = "--model") -> str:
    """A ``--model`` value that is an existing folder or could be a hub id ('name' or 'org/name');
    anything else (an absolute or relative path that is not there) is a one-line error here,
    instead of the hub client's "Repo id must be in the form ..."."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{option} {model}: not a model folder (a file)")
        return str(path)
    if model.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(model):
        raise FileNotFoundError(f"{option} {model}: no such model folder")
    return model
