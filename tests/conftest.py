"""Test-wide settings: Prefect in a temporary home, offline hubs, GPU skipping, shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect or the HF hub libraries.
_HOME = Path(tempfile.mkdtemp(prefix="alignflow-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", str(_HOME / "hf-datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Subprocesses (the CLI, flow workers) import this checkout, whatever alignflow is installed.
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

SHARED = Path(os.environ.get("ALIGNFLOW_SHARED") or ROOT.parent / "shared")  # a worktree elsewhere: set it
HUMAN_LABELS = SHARED / "data" / "human-labels"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: GPU tests cannot run anyway
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def human_labels() -> Path:
    if not HUMAN_LABELS.is_dir():
        pytest.skip(f"{HUMAN_LABELS} not present")
    return HUMAN_LABELS


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The SFT'd toy world, built once per test session (seeded, deterministic)."""
    from alignflow.flows.toy_world import build_toy_world

    return build_toy_world(tmp_path_factory.mktemp("toy-world"), seed=0)


@pytest.fixture(scope="session")
def prefect_server():
    """One embedded Prefect server for the flow tests of the session (slow machines: 90 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def bpe_world(tmp_path_factory):
    """The SFT'd BPE world (byte-level BPE + ChatML, tiny Qwen2), built once per test session."""
    from alignflow.flows.bpe_world import build_bpe_world

    return build_bpe_world(tmp_path_factory.mktemp("bpe-world"), seed=0)


@pytest.fixture(scope="session", params=["toy", "bpe"])
def world(request):
    """Each embedded world in turn (a test using it runs once per world)."""
    return request.getfixturevalue(f"{request.param}_world")
