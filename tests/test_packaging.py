"""Packaging: the four folders install and import as alignflow.*, never as bare top-level names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("schemas", "feedback", "trainers", "flows")


def _package_folders() -> set[str]:
    return {"alignflow." + str(init.parent.relative_to(ROOT)).replace("/", ".")
            for top in FOLDERS for init in (ROOT / top).rglob("__init__.py")}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert _package_folders() | {"alignflow"} == listed
    assert {config["package-dir"][f"alignflow.{top}"] for top in FOLDERS} == set(FOLDERS)


def test_a_users_own_schemas_and_flows_modules_break_nothing(tmp_path):
    # A user's project with modules named like our folders, first on sys.path.
    for name in FOLDERS:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    code = ("import alignflow.flows.cli, alignflow.schemas.store, alignflow.feedback.labels, "
            "alignflow.trainers.losses; from alignflow.flows.cli import app; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['formats']); "
            "assert r.exit_code == 0, r.output; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_the_wheel_holds_alignflow_only(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "tests", "build", "*.egg-info", "__pycache__",
                                                             "alignflow-runs", ".prefect"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("alignflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"alignflow"}
    for needed in ("alignflow/schemas/store.py", "alignflow/flows/cli.py", "alignflow/trainers/losses/README.md",
                   "alignflow/feedback/constitutions/default.yaml", "alignflow/flows/configs/demo.yaml"):
        assert needed in names
