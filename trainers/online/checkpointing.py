"""Checkpoints of online runs: a killed run resumes from its newest one (same output folder,
same config). Each checkpoint is a folder written atomically: the tensors (weights, optimizer
states, RNG states) and a JSON record (step/round, fingerprint, history, spend, the starting
evaluation)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from alignflow.schemas.online import OnlineReport
from alignflow.trainers.online.rollout import Spend

CHECKPOINT_STATE = "state.pt"  # tensors: weights, optimizer states, RNG states
CHECKPOINT_META = "meta.json"  # step/round, fingerprint, history, spend, starting evaluation
# config fields that may differ between a run and its resumption (extending a run is allowed)
RESUMABLE_FIELDS = ("steps", "rounds", "checkpoint_every")


def run_fingerprint(config: Any, prompts: Sequence[Any], ignore: Sequence[str] = RESUMABLE_FIELDS) -> str:
    """Hash of the config (minus ``ignore``) and the training prompts: a checkpoint is resumed
    only by a run that would have produced it."""
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    payload = {"config": {k: v for k, v in cfg.items() if k not in ignore}, "prompts": list(prompts)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state(gen: torch.Generator) -> dict:
    """The global torch RNG (sampling seeds) and the trainer's own generator (prompt order)."""
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(index: int, prefix: str = "step") -> str:
    return f"{prefix}-{index:06d}"


def save_checkpoint(folder: str | Path, name: str, state: dict, meta: dict, keep_weights: int = 1,
                    files: dict[str, str] | None = None) -> Path:
    """Write ``folder/name/{state.pt, meta.json, *files}`` atomically (a temporary folder renamed
    into place, so a kill leaves either the whole checkpoint or none). Older checkpoints keep
    their ``meta.json`` and ``files`` (the record) but lose ``state.pt`` beyond the newest
    ``keep_weights``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / CHECKPOINT_STATE)
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1, default=float))
    for fname, text in (files or {}).items():
        (tmp / fname).write_text(text)
    for f in (tmp / CHECKPOINT_STATE, tmp / CHECKPOINT_META):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = folder / name
    if final.exists():  # the same step saved again (a resumed run that had finished it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    complete = sorted(p for p in folder.iterdir() if p.is_dir() and (p / CHECKPOINT_STATE).exists()
                      and not p.name.startswith("."))
    for old in complete[:-keep_weights] if keep_weights > 0 else []:
        (old / CHECKPOINT_STATE).unlink()
    return final


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The newest complete checkpoint under ``folder`` (names sort by step), or None."""
    if folder is None or not Path(folder).is_dir():
        return None
    done = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / CHECKPOINT_STATE).exists() and (p / CHECKPOINT_META).exists())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, fingerprint: str) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint; ValueError when it was written by a different run."""
    path = Path(path)
    meta = json.loads((path / CHECKPOINT_META).read_text())
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path}: checkpoint of a different config or prompts (fingerprint "
                         f"{meta.get('fingerprint')} != {fingerprint}); use another output folder or delete it")
    # on CPU first: a checkpoint written on a GPU node resumes anywhere; load_state_dict copies
    # weights and optimizer moments onto the live parameters' devices
    return torch.load(path / CHECKPOINT_STATE, weights_only=True, map_location="cpu"), meta


def spend_of(meta: dict) -> Spend:
    return Spend(**meta.get("spend", {}))


def find_resume(checkpoint_dir: str | Path | None, fingerprint: str) -> tuple[dict | None, dict | None]:
    """(tensors, meta) of the newest checkpoint of this run under ``checkpoint_dir``, else (None, None)."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None, None
    state, meta = load_checkpoint(path, fingerprint)
    meta["path"] = str(path)
    return state, meta


def checkpoint_meta(index: int, fingerprint: str, report: OnlineReport, spend: Spend, first: dict, **extra) -> dict:
    """What a resumed run needs besides tensors: where it was, its record so far, its spend
    and the starting policy's evaluation (``begin_run``'s ``first``)."""
    return {"index": index, "fingerprint": fingerprint, "history": report.history, "spend": asdict(spend),
            "first": {k: first[k] for k in ("reward", "rewards", "responses") if k in first}, **extra}
