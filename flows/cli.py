"""The ``alignflow`` command line.

Commands live in ``flows/commands/<area>.py``, each with a ``register(app)`` function.
Start-up stays fast: command modules import torch, transformers, datasets or prefect only
inside the command bodies that need them.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import time

import typer

app = typer.Typer(
    name="alignflow",
    help="Turn prompts and human labels into alignment data, and alignment data into aligned models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Garbage collection while a command imports its libraries (start_up_collections): generation 0
# every 10,000 net allocations instead of 700, full collections about never.
START_UP_THRESHOLDS, START_UP_S = (10_000, 50, 100), 10.0

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


def start_up_collections(seconds: float = START_UP_S) -> None:
    """Rarer garbage collections for the first ``seconds`` of the process, the defaults after.

    Importing torch and transformers makes about a million objects that live to the end. At
    the default thresholds, Python runs 8 full collections over them while they arrive, about
    0.7-1.0 s of a 6 s training start-up (measured). Cycles are still collected, only less often,
    and the long work runs under the defaults.
    """
    defaults = gc.get_threshold()
    gc.set_threshold(*START_UP_THRESHOLDS)
    deadline = time.monotonic() + seconds
    pending = True

    def restore(phase: str, info: dict) -> None:
        # stays in gc.callbacks as a no-op: removing it while the collector walks the list could skip another
        nonlocal pending
        if pending and time.monotonic() > deadline:
            pending = False
            gc.set_threshold(*defaults)

    gc.callbacks.append(restore)


def main() -> None:
    """The ``alignflow`` entry point: runs one command, then the process exits."""
    from alignflow.flows.commands import common

    common.OWNS_PROCESS = True
    start_up_collections()
    try:
        app()
    finally:
        # Python's shutdown runs the cyclic garbage collector over every object still alive,
        # torch's and transformers' modules included: about 1 s of a training run's exit, measured.
        # It skips frozen objects. Exit handlers (atexit, weakref.finalize) still run, and objects
        # freed by reference counting are still finalized; only objects held in reference cycles
        # are left to the operating system, which Python's shutdown already allows.
        gc.freeze()


if __name__ == "__main__":
    main()
