"""Which inputs made each step's output: a rerun reuses an output only if they are unchanged.

Steps resume from their outputs (no Prefect cache, see ``tasks._tasks``): a finished step finds
its output and returns it. Alone, that would reuse an output made from other inputs when a run
folder is rerun with a changed config (another judge, model, seed or prompts file), silently.
So the step runner keeps, per output, a record of the inputs that made it:

    RUN/.alignflow/steps/<step>-<hash of the output path>.json   {"step", "output", "key", "inputs"}

``key`` hashes the step's arguments (its output path left out, secrets masked) and, for every
argument naming a file, folder or dataset, what is there now: a dataset's shard checksums from
its manifest, a file's or a checkpoint folder's sizes and modification times. An output whose
record is missing or holds another key is removed before the step runs, so the step makes it
again, and the steps after it see a changed input in turn. The record is written before the
step runs (an output only ever appears under the record of its own inputs), by the runner's
process. Records are plain JSON: nothing in a run folder is ever executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from alignflow.schemas.store import is_dataset, read_manifest, scrub_secrets

log = logging.getLogger("alignflow.flows")

RECORDS = Path(".alignflow") / "steps"


def output_of(step: str, kwargs: dict) -> Path | None:
    """What makes step ``step`` return early (its output); None for a step that always runs."""
    if step == "import_prompts":  # converts each time (a store prompts dataset is used in place)
        return None
    if step == "build_feedback":
        return Path(kwargs["out_dir"]) / "feedback.json"
    if step == "merge_critiques":
        return Path(kwargs["out_dir"]) / "sft"
    if step == "build_world":
        return Path(kwargs["out"]) / "world.json"
    return Path(kwargs["out"]) if "out" in kwargs else None


def _fingerprint(value: str) -> Any:
    """What is at ``value`` now, if it names something on disk (else None)."""
    path = Path(value)
    try:
        if is_dataset(path):
            return hashlib.sha256(json.dumps(read_manifest(path)["shards"], sort_keys=True).encode()).hexdigest()
        if path.is_file():
            st = path.stat()
            return [st.st_size, st.st_mtime_ns]
        if path.is_dir():  # a checkpoint folder: its files' sizes and times
            return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())
    except (OSError, ValueError):
        return None
    return None


def _with_fingerprints(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _with_fingerprints(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_fingerprints(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value and len(value) < 4096:
        found = _fingerprint(value)
        if found is not None:
            return {"path": value, "content": found}
    return value


def step_inputs(kwargs: dict) -> tuple[str, dict]:
    """(key, inputs): the step's arguments but its output, secrets masked, paths fingerprinted."""
    inputs = _with_fingerprints(scrub_secrets({k: v for k, v in kwargs.items() if k not in ("out", "out_dir")}))
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return key, inputs


class StepRecords:
    """The records of one run folder (read and written by the step runner's process only)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir).resolve()
        self.folder = self.run_dir / RECORDS

    def _file(self, step: str, output: Path) -> Path:
        return self.folder / f"{step}-{hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:16]}.json"

    def prepare(self, step: str, kwargs: dict) -> None:
        """Before ``step`` runs: remove its output if other inputs made it, and record the inputs
        it is about to be made from. Recording first means a kill at any point leaves either no
        output (the step runs again) or an output with its own inputs' record."""
        output = output_of(step, kwargs)
        if output is None:
            return
        key, inputs = step_inputs(kwargs)
        record = self._read(step, output)
        if output.exists() and (record is None or record.get("key") != key):
            self._remove(step, output, _changed(record, inputs))
        if record is None or record.get("key") != key:
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self._file(step, output)
            tmp = target.with_name(target.name + ".partial")
            tmp.write_text(json.dumps({"step": step, "output": str(output), "key": key, "inputs": inputs},
                                      indent=1, sort_keys=True, default=str))
            os.replace(tmp, target)

    def _read(self, step: str, output: Path) -> dict | None:
        try:
            record = json.loads(self._file(step, output).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _remove(self, step: str, output: Path, why: str) -> None:
        resolved = output.resolve()
        if not resolved.is_relative_to(self.run_dir):
            raise ValueError(f"{step}: {output} was made from other inputs ({why}) and lies outside the run folder "
                             f"{self.run_dir}; remove it or use another output")
        log.warning("%s: %s was made from other inputs (%s); making it again", step, output, why)
        if resolved.is_dir() and not resolved.is_symlink():
            shutil.rmtree(resolved)
        else:
            resolved.unlink()


def _changed(record: dict | None, inputs: dict) -> str:
    """The arguments whose value differs from the record's (for the log line)."""
    if record is None or not isinstance(record.get("inputs"), dict):
        return "no record of its inputs"
    before = record["inputs"]
    names = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    return "changed: " + ", ".join(names) if names else "changed"
