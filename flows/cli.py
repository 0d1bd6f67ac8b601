"""The ``alignflow`` command line.

Commands live in ``flows/commands/<area>.py``, each with a ``register(app)`` function.
Start-up stays fast: command modules import torch, transformers, datasets or prefect only
inside the command bodies that need them.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(
    name="alignflow",
    help="Turn prompts and human labels into alignment data, and alignment data into aligned models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per area; a module not present in this checkout is skipped.
COMMAND_MODULES = (
    "alignflow.flows.commands.data",  # inspect, validate, report
    "alignflow.flows.commands.labels",  # formats, convert
    "alignflow.flows.commands.train",  # train, precompute-ref
    "alignflow.flows.commands.feedback",  # generate, judge, critique, rejection-sample
    "alignflow.flows.commands.online",  # reward models, RL, iterative methods, token rewards
    "alignflow.flows.commands.run",  # run, demo, serve
)

for _name in COMMAND_MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name).register(app)


def main() -> None:
    from alignflow.flows.commands import common

    common.OWNS_PROCESS = True
    app()


if __name__ == "__main__":
    main()
