"""The ``alignflow`` entry point's garbage collection: rarer collections while a command imports its
libraries, the defaults after; the shutdown's collections skipped (gc.freeze). Together 1.5-1.7 s
of a training process's 6 s fixed cost. Exit codes, exit handlers and written output stay as they were."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time

# Runs the entry point as the console script does, with an exit handler registered first: it
# runs last, after main() has returned, and reports what the shutdown will see.
PROBE = """
import atexit, gc, json, sys
atexit.register(lambda: print("AT_EXIT " + json.dumps({"frozen": gc.get_freeze_count()}), flush=True))
sys.argv = ["alignflow", *ARGS]
from alignflow.flows.cli import main
main()
"""


def run_entry_point(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    code = PROBE.replace("ARGS", json.dumps(list(args)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("AT_EXIT ")]
    assert lines, f"the exit handler did not run:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(lines[-1][len("AT_EXIT "):])


def test_a_command_exits_with_the_imported_objects_frozen_and_its_output_written(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": f"p{i}", "chosen": "yes", "rejected": "no"}) for i in range(3)) + "\n")
    result, at_exit = run_entry_point("convert", str(src), str(tmp_path / "out.parquet"), "--from", "trl-preference",
                                      "--to", "trl-preference")
    assert result.returncode == 0, result.stderr
    assert "read 3 = written 3" in result.stdout
    assert (tmp_path / "out.parquet").stat().st_size > 0
    # typer, pyarrow and our modules: tens of thousands of objects the shutdown's collections now skip
    assert at_exit["frozen"] > 10_000, at_exit


def test_an_error_keeps_its_exit_code_and_message(tmp_path):
    result, at_exit = run_entry_point("convert", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.parquet"),
                                      "--from", "nectar", "--to", "pairwise")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "missing.jsonl: no such file" in result.stderr
    assert at_exit["frozen"] > 0


def test_start_up_collections_are_rarer_then_the_defaults_come_back():
    from alignflow.flows.cli import START_UP_THRESHOLDS, start_up_collections

    defaults, callbacks = gc.get_threshold(), list(gc.callbacks)
    try:
        start_up_collections(seconds=0.3)
        assert gc.get_threshold() == START_UP_THRESHOLDS != defaults
        gc.collect(0)  # before the deadline: still the start-up thresholds
        assert gc.get_threshold() == START_UP_THRESHOLDS
        time.sleep(0.35)
        gc.collect(0)  # the next collection after the deadline restores them
        assert gc.get_threshold() == defaults
        gc.set_threshold(1000, 10, 10)
        gc.collect(0)  # and the callback leaves later settings alone
        assert gc.get_threshold() == (1000, 10, 10)
    finally:
        gc.callbacks[:] = callbacks
        gc.set_threshold(*defaults)
