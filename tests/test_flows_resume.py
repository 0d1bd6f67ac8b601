"""Flows that hold: SIGKILL in the middle of generation then resume, and multi-process training.

The crash test runs the real CLI in its own process group with its own PREFECT_HOME, kills
the CLI process alone (SIGKILL) while shards are being generated, checks that nothing of its
group survives it (the embedded Prefect server goes too: issue 17, item 9), reruns, and compares
the final datasets with an uninterrupted run: same rows, same shard checksums, no duplicates,
nothing lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from alignflow.flows import tasks
from alignflow.flows.config import GenerateFeedbackConfig
from alignflow.schemas.store import MANIFEST, read_dataset, read_manifest, verify_dataset, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """An untrained char-level Llama (fast; generation and training mechanics only)."""
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint

    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    return str(save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model"))


def _prompts(path: Path, n: int, seed: int = 5) -> str:
    from alignflow.feedback.toy_task import ToyTask

    write_dataset(path, pa.table({"prompt": ToyTask().prompts(n, seed=seed)}), "prompts")
    return str(path)


def _feedback_config(out: Path, model: str, prompts: str, **generation) -> dict:
    return {"name": "crash", "output": str(out), "model": model, "prompts": prompts, "seed": 3,
            "generation": {"backend": "hf", "k": 4, "max_new_tokens": 24, "shard_size": 2, "batch_size": 64,
                           "device": "cpu", **generation},
            "feedback": {"judge": "verifier", "kind": "pairwise"}}


def _same_datasets(a: str | Path, b: str | Path) -> None:
    ma, mb = verify_dataset(a), verify_dataset(b)
    assert ma["num_rows"] == mb["num_rows"]
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert read_dataset(a).equals(read_dataset(b))


def _live_members(pgid: int) -> set[int]:
    """Processes of group ``pgid`` that have not exited (zombies waiting to be reaped left out)."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.add(int(entry))
    return members


def _wait_for_group_gone(pgid: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"process group {pgid} still alive after SIGKILL")


@pytest.mark.slow
def test_sigkill_mid_generation_then_resume_equals_uninterrupted(tmp_path, tiny_model):
    n_prompts, k = 16, 4
    prompts = _prompts(tmp_path / "prompts", n_prompts)
    n_shards = n_prompts // 2

    # Uninterrupted reference run: the same steps called directly (tests/test_flows.py checks
    # that plain calls and the Prefect flow give byte-identical datasets).
    from alignflow.flows.generate_feedback import run_generate_feedback

    ref_cfg = GenerateFeedbackConfig.model_validate(_feedback_config(tmp_path / "reference", tiny_model, prompts))
    reference = run_generate_feedback(ref_cfg, tasks.PlainSteps(ref_cfg.output))

    run_dir = tmp_path / "crashed"
    config = tmp_path / "crash.yaml"
    config.write_text(yaml.safe_dump(_feedback_config(run_dir, tiny_model, prompts)))
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_TO_API_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "alignflow.flows.cli", "run", "generate_feedback", "--config", str(config)]

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: the server joins it
    shards = run_dir / "shards"
    finished: dict[str, float] = {}
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in shards.glob("samples-*") if (p / MANIFEST).exists()] if shards.exists() else []
        if done:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert _live_members(proc.pid) - {proc.pid}, "no embedded server to check"
    os.kill(proc.pid, signal.SIGKILL)  # the CLI alone: its embedded server must not outlive it
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and _live_members(proc.pid):
        time.sleep(0.1)
    survivors = _live_members(proc.pid)
    _wait_for_group_gone(proc.pid)
    assert not survivors, f"processes of the killed run still running: {survivors}"
    finished = {p.name: (p / MANIFEST).stat().st_mtime_ns
                for p in shards.glob("samples-*") if (p / MANIFEST).exists()}
    assert 1 <= len(finished) < n_shards, f"killed after {len(finished)} of {n_shards} shards"
    assert not (run_dir / "pairwise").exists()

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Shards finished before the kill were skipped, not redone.
    for name, mtime in finished.items():
        assert (shards / name / MANIFEST).stat().st_mtime_ns == mtime, name

    for kind in ("samples", "pairwise"):
        _same_datasets(reference["samples"] if kind == "samples" else reference["dataset"], run_dir / kind)
    samples = read_dataset(run_dir / "samples")
    per_prompt = pc.value_counts(samples.column("prompt_id")).field("counts").to_numpy()
    assert samples.num_rows == n_prompts * k and len(per_prompt) == n_prompts and (per_prompt == k).all()
    stats = json.loads((run_dir / "feedback.json").read_text())
    assert stats["rows"] + stats["quarantined"] + stats["dropped"] == n_prompts


@pytest.mark.slow
def test_two_process_training_equals_single_process(tmp_path, tiny_model):
    """accelerate launch with 2 CPU processes (gloo) == one process on the same global batch."""
    import torch
    from transformers import AutoModelForCausalLM

    words = ["abc", "hello", "xyz", "qq", "mnop", "rst", "uvw", "ij"]
    table = pa.table({"prompt": [f"Copy exactly: {w}" for w in words], "chosen": words,
                      "rejected": [w[::-1] + "z" for w in words], "margin": [1.0] * 8, "source": ["rule"] * 8})
    write_dataset(tmp_path / "pairs", table, "pairwise")
    data = tasks.precompute_reference(str(tmp_path / "pairs-ref"), dataset=str(tmp_path / "pairs"),
                                      reference=tiny_model)
    # Global batch = all 8 pairs in every step, so the result does not depend on data order.
    base = {"loss": "dpo", "params": {"beta": 0.1}, "learning_rate": 1e-2, "epochs": 1, "max_steps": 2}
    single = tasks.train_policy(str(tmp_path / "single"), dataset=data, model=tiny_model,
                                train={**base, "batch_size": 8, "num_processes": 1})
    double = tasks.train_policy(str(tmp_path / "ddp"), dataset=data, model=tiny_model,
                                train={**base, "batch_size": 4, "num_processes": 2})
    assert json.loads((Path(double) / "alignflow_train.json").read_text())["world_size"] == 2
    a = AutoModelForCausalLM.from_pretrained(single).state_dict()
    b = AutoModelForCausalLM.from_pretrained(double).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    moved = max((a[n] - start[n]).abs().max().item() for n in a)
    diff = max((a[n] - b[n]).abs().max().item() for n in a)
    assert moved > 1e-3 and diff < 1e-4 * max(1.0, moved / 1e-2), (moved, diff)
    assert all(torch.isfinite(t).all() for t in b.values())


@pytest.mark.slow
def test_sigkill_mid_convert_then_rerun_goes_on_from_the_finished_shards(tmp_path):
    """`alignflow convert` killed (SIGKILL) while writing shards: nothing visible; the rerun keeps
    the shards already finished (untouched files) and ends with the dataset of an uninterrupted run."""
    import numpy as np
    import pyarrow.parquet as pq

    from alignflow.feedback.labels import convert_labels_file

    rows, k = 200_000, 6  # 15 pairs a row: 3,000,000 pairs in 7 shards (a shard closes after 2 batches of 16,384 rows)
    rng = np.random.default_rng(0)
    ids = np.arange(rows).astype(str).astype(object)
    responses = np.char.add(np.repeat(ids, k).astype(str), np.tile(np.array([" a", " b", " c", " d", " e", " f"]), rows))
    src = tmp_path / "lists.parquet"
    pq.write_table(pa.table({
        "prompt_id": pa.array(ids, pa.string()),
        "prompt": pa.array(np.char.add("question ", ids.astype(str)).astype(object), pa.string()),
        "responses": pa.ListArray.from_arrays(pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32)),
                                              pa.array(responses.astype(object), pa.string())),
        "scores": pa.ListArray.from_arrays(pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32)),
                                           pa.array(rng.permuted(np.tile(np.arange(k, dtype=float), (rows, 1)), axis=1).ravel())),
    }), src)
    reference = convert_labels_file(src, tmp_path / "reference", "listwise", "pairwise")
    n_shards = len(read_manifest(tmp_path / "reference")["shards"])
    assert n_shards == 7

    out = tmp_path / "pairs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "alignflow.flows.cli", "convert", str(src), str(out), "--from", "listwise", "--to", "pairwise"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    progress = out.with_name("pairs.partial") / "progress.json"

    def finished() -> list[dict]:
        try:
            return [s for s in json.loads(progress.read_text())["shards"] if "meta" in s]
        except (OSError, ValueError):
            return []

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(finished()) < 2:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_for_group_gone(proc.pid)
    done = sorted(s["key"] for s in finished())
    assert 2 <= len(done) < n_shards and not out.exists()
    # two shards are written at a time, so a later one may have finished before an earlier one:
    # what a rerun keeps is the unbroken run of finished shards from the first
    prefix = [key for i, key in enumerate(done) if key == f"{i:05d}"]
    kept = {f"train-{key}.parquet": (out.with_name("pairs.partial") / f"train-{key}.parquet").stat().st_mtime_ns
            for key in prefix}
    assert len(kept) >= 1

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed an interrupted run" in rerun.stdout
    assert reference.line() in rerun.stdout  # the same accounting as one uninterrupted run
    manifest = verify_dataset(out)
    kept_now = {name: (out / name).stat().st_mtime_ns for name in kept}
    assert kept_now == kept  # finished shards were not redone (a shard is rewritten only if unfinished)
    _same_datasets(tmp_path / "reference", out)
    assert manifest["num_rows"] == reference.rows_out == 3_000_000
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [f"train-{i:05d}.parquet" for i in range(n_shards)]
