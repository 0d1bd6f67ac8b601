"""Flows: configs, deployments, task runners, retries and shard isolation, align_from_prompts.

Fast tests use a fake generation backend (no model); the flow tests run on the embedded
Prefect server of the session (PREFECT_HOME is a temp folder, see conftest.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from alignflow.flows import tasks
from alignflow.flows.config import AlignConfig, GenerateFeedbackConfig, describe, load_config
from alignflow.schemas.generator import Generation
from alignflow.schemas.store import MANIFEST, read_dataset, read_manifest, verify_dataset, write_dataset

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def test_demo_config_loads_with_overrides():
    cfg = load_config("align", ROOT / "flows/configs/demo.yaml", ["iterations=3", "train.params.beta=0.25",
                                                                    "generation.k=6"])
    assert isinstance(cfg, AlignConfig)
    assert cfg.iterations == 3 and cfg.train.params == {"beta": 0.25} and cfg.generation.k == 6
    assert cfg.train.loss == "dpo" and cfg.feedback.judge == "verifier"


@pytest.mark.parametrize("override, field", [("train.lossx=1", "train.lossx"), ("generation.k=0", "generation.k"),
                                             ("train.loss=nope", "train")])
def test_bad_config_names_file_and_field(override, field):
    with pytest.raises(ValueError) as err:
        load_config("align", ROOT / "flows/configs/demo.yaml", [override])
    text = str(err.value)
    assert "demo.yaml" in text and f"field {field}" in text and "\n" not in text


def test_every_config_field_is_documented():
    from alignflow.flows.config import CONFIGS

    for name, model in CONFIGS.items():
        rows = describe(model)
        assert rows, name
        undocumented = [r[0] for r in rows if not r[2].strip() and r[0] != "name" or not r[2].strip()
                        and name != "convert_labels"]
        assert not undocumented, f"{name}: fields without description: {undocumented}"


# ---------------------------------------------------------------------------------------------
# Deployments and task runners (no server needed)
# ---------------------------------------------------------------------------------------------

def test_prefect_yaml_deployments_load_with_schedules():
    from alignflow.flows.runtime import load_deployments, read_deployments

    specs = {d["name"]: d for d in read_deployments(ROOT / "prefect.yaml")}
    deployments = {d.name: d for d in load_deployments(ROOT / "prefect.yaml")}
    assert set(deployments) == set(specs) and "nightly-generate-feedback" in deployments
    nightly = deployments["nightly-generate-feedback"]
    assert nightly.flow_name == "generate-feedback"
    cron = nightly.schedules[0].schedule
    assert cron.cron == "0 2 * * *" and cron.timezone == "UTC"
    # The nightly parameters are a valid generate_feedback config.
    GenerateFeedbackConfig.model_validate(nightly.parameters["config"])
    assert deployments["align-from-prompts"].flow_name == "align-from-prompts"


def test_task_runner_option():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from alignflow.flows.runtime import make_task_runner

    assert isinstance(make_task_runner("threads", 3), ThreadPoolTaskRunner)
    assert isinstance(make_task_runner("dask", 2), DaskTaskRunner)
    with pytest.raises(ValueError, match="unknown task runner"):
        make_task_runner("mpi")


def test_embedded_environment_defaults(tmp_path, monkeypatch):
    from alignflow.flows.runtime import embedded_environment

    for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "true")  # a user's choice is kept
    monkeypatch.chdir(tmp_path)
    embedded_environment()
    assert os.environ["PREFECT_HOME"] == str((tmp_path / ".prefect").resolve())
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_LOGGING_TO_API_ENABLED"] == "true"
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")  # a real server: no local home
    embedded_environment()
    assert "PREFECT_HOME" not in os.environ


def test_sigterm_becomes_system_exit():
    import signal

    from alignflow.flows.runtime import sigterm_exits

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        with sigterm_exits():
            os.kill(os.getpid(), signal.SIGTERM)
            import time

            time.sleep(5)  # the handler interrupts this
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_transient_errors_are_classified():
    class HTTPError(Exception):
        def __init__(self, status):
            self.status_code = status

    assert tasks.is_transient(ConnectionError()) and tasks.is_transient(TimeoutError())
    assert tasks.is_transient(HTTPError(503)) and tasks.is_transient(HTTPError(429))
    assert not tasks.is_transient(HTTPError(400)) and not tasks.is_transient(ValueError("bad prompt"))


def test_cli_run_show_config_errors_and_serve_list(tmp_path):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["run", "align", "--show-config"])
    assert shown.exit_code == 0 and "train.loss" in shown.output and "termination.alpha" in shown.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: 0\n")
    res = runner.invoke(app, ["run", "align", "--config", str(bad)])
    assert res.exit_code == 2 and "bad.yaml" in res.output and "iterations" in res.output
    res = runner.invoke(app, ["run", "nope"])
    assert res.exit_code == 2 and "unknown flow" in res.output
    listed = runner.invoke(app, ["serve", "--list", "--file", str(ROOT / "prefect.yaml")])
    assert listed.exit_code == 0 and "nightly-generate-feedback" in listed.output and "0 2 * * *" in listed.output


# ---------------------------------------------------------------------------------------------
# Dataset building (pure functions)
# ---------------------------------------------------------------------------------------------

def _scored(rewards: list[list[float]]) -> pa.Table:
    rows = {"prompt": [], "response": [], "reward": []}
    for p, rs in enumerate(rewards):
        for k, r in enumerate(rs):
            rows["prompt"].append(f"Copy exactly: p{p}")
            rows["response"].append(f"r{p}-{k}" + "x" * k)
            rows["reward"].append(r)
    from alignflow.schemas.prompts import normalize_prompt_columns

    return normalize_prompt_columns(pa.table(rows))


def test_preference_tables_from_scored_samples():
    scored = _scored([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [1.0, 0.0, 0.2]])
    pairs = tasks.preference_table(scored, "pairwise")
    assert pairs.num_rows == 2  # the all-tied prompt gives no pair
    assert pairs.column("chosen").to_pylist() == ["r0-1x", "r2-0"]
    assert pairs.column("rejected").to_pylist() == ["r0-0", "r2-1x"]
    binary = tasks.preference_table(scored, "binary")
    # above / below the prompt's mean reward; rows at the mean (and the all-tied prompt) are dropped
    assert binary.column("response").to_pylist() == ["r0-0", "r0-1x", "r2-0", "r2-1x", "r2-2xx"]
    assert binary.column("label").to_pylist() == [False, True, True, False, False]
    listwise = tasks.preference_table(scored, "listwise")
    assert listwise.column("scores").to_pylist()[0] == [0.1, 0.9, 0.5]


def test_length_bias_sign():
    longer_wins = pa.table({"chosen": ["aaaa", "bbbbb"], "rejected": ["a", "bb"]})
    shorter_wins = pa.table({"chosen": ["a", "bb"], "rejected": ["aaaa", "bbbbb"]})
    assert tasks.length_bias(longer_wins, "pairwise") == pytest.approx(1.0)
    assert tasks.length_bias(shorter_wins, "pairwise") == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# Flows with a fake backend: retries with backoff, a failed shard does not poison the others
# ---------------------------------------------------------------------------------------------

class FakeGenerator:
    """Deterministic responses; raises on prompts listed in ``fail`` (a transient backend error)."""

    name = "fake"

    def __init__(self, model: str, failures: dict, calls: list):
        self.model_name = model
        self.failures, self.calls = failures, calls

    def generate(self, prompts, n=1, sampling=None):
        words = [p[-1]["content"] for p in prompts]
        self.calls.append(tuple(words))
        for w in words:
            if self.failures.get(w, 0) > 0:
                self.failures[w] -= 1
                raise tasks.TransientBackendError(f"server busy on {w!r}")
        rng = np.random.default_rng(sampling.seed)
        return [[Generation(text=w.split(": ")[1][: 1 + int(rng.integers(0, 4))], n_tokens=3, logp=-1.0)
                 for _ in range(n)] for w in words]

    def score(self, prompt, continuations):
        return [-1.0] * len(continuations)


@pytest.fixture
def fake_backend():
    state = {"failures": {}, "calls": []}

    def factory(model, **_):
        return FakeGenerator(model, state["failures"], state["calls"])

    tasks.BACKEND_FACTORIES["fake"] = factory
    tasks.clear_generators()
    yield state
    tasks.BACKEND_FACTORIES.pop("fake", None)
    tasks.clear_generators()


def _prompts(path: Path, n: int) -> str:
    from alignflow.feedback.toy_task import ToyTask

    write_dataset(path, pa.table({"prompt": ToyTask().prompts(n, seed=3)}), "prompts")
    return str(path)


def _feedback_config(tmp: Path, prompts: str, **over) -> GenerateFeedbackConfig:
    data = {"name": "t", "output": str(tmp / "run"), "model": "fake-model", "prompts": prompts,
            "generation": {"backend": "fake", "k": 3, "shard_size": 2, "retries": 2, "retry_delays": [0, 0]},
            "feedback": {"judge": "verifier", "kind": "pairwise"}}
    data.update(over)
    return GenerateFeedbackConfig.model_validate(data)


def _run_generate_feedback(cfg):
    from alignflow.flows.generate_feedback import generate_feedback
    from alignflow.flows.runtime import prefect_session

    with prefect_session():
        return generate_feedback(config=cfg.model_dump(mode="json"), return_state=True)


def test_retries_and_failed_shard_isolation(tmp_path, fake_backend, prefect_server):
    prompts = _prompts(tmp_path / "prompts", 8)  # 4 shards of 2 prompts
    words = read_dataset(prompts).column("prompt").to_pylist()
    flaky, broken = words[2][0]["content"], words[4][0]["content"]  # shard 1 and shard 2
    fake_backend["failures"].update({flaky: 1, broken: 99})
    cfg = _feedback_config(tmp_path, prompts)

    state = _run_generate_feedback(cfg)
    assert state.is_failed()
    with pytest.raises(Exception, match="1 of 4 shards failed"):
        state.result()
    shards = tmp_path / "run" / "shards"
    done = sorted(p.name for p in shards.glob("samples-*") if (p / MANIFEST).exists())
    assert done == ["samples-00000", "samples-00001", "samples-00003"]  # flaky shard recovered by a retry
    assert sum(flaky in c for c in fake_backend["calls"]) == 2  # one failure, one retry
    assert sum(broken in c for c in fake_backend["calls"]) == 3  # first try + 2 retries

    fake_backend["failures"].clear()  # the backend recovers; the rerun redoes only shard 2
    fake_backend["calls"].clear()
    state = _run_generate_feedback(cfg)
    assert state.is_completed()
    assert fake_backend["calls"] == [(words[4][0]["content"], words[5][0]["content"])]
    stats = state.result()
    pairs = read_dataset(stats["dataset"])
    assert stats["rows"] == pairs.num_rows and stats["rows"] + stats["quarantined"] + stats["dropped"] == 8
    assert read_dataset(stats["samples"]).num_rows == 8 * 3


def test_plain_steps_match_flow_shards(tmp_path, fake_backend, prefect_server):
    """The step functions without Prefect produce the same datasets (the benchmark's baseline)."""
    from alignflow.flows.generate_feedback import run_generate_feedback

    prompts = _prompts(tmp_path / "prompts", 6)
    cfg = _feedback_config(tmp_path, prompts, output=str(tmp_path / "plain"))
    stats = run_generate_feedback(cfg, tasks.PlainSteps(cfg.output))
    cfg2 = _feedback_config(tmp_path, prompts, output=str(tmp_path / "flow"))
    flow_stats = _run_generate_feedback(cfg2).result()
    for key in ("samples", "dataset"):
        a, b = read_manifest(stats[key]), read_manifest(flow_stats[key])
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


# ---------------------------------------------------------------------------------------------
# Scale-out and the full pipeline (real tiny models)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """An untrained char-level Llama (fast; generation mechanics only)."""
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint

    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    return str(save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model"))


def _hf_feedback_config(out: Path, model: str, prompts: str, **generation) -> dict:
    return {"name": "dask", "output": str(out), "model": model, "prompts": prompts, "seed": 3,
            "generation": {"backend": "hf", "k": 4, "max_new_tokens": 16, "shard_size": 2, "device": "cpu",
                           **generation},
            "feedback": {"judge": "verifier", "kind": "pairwise"}}


@pytest.mark.slow
def test_dask_two_workers_shard_generation(tmp_path, tiny_model, prefect_server):
    """generate_feedback on a local 2-worker Dask cluster gives the datasets of a plain run."""
    from alignflow.flows.generate_feedback import generate_feedback, run_generate_feedback
    from alignflow.flows.runtime import prefect_session, with_runner

    prompts = _prompts(tmp_path / "prompts", 8)
    plain_cfg = GenerateFeedbackConfig.model_validate(_hf_feedback_config(tmp_path / "plain", tiny_model, prompts,
                                                                          shard_size=4))
    plain = run_generate_feedback(plain_cfg, tasks.PlainSteps(plain_cfg.output))
    cfg = _hf_feedback_config(tmp_path / "dask", tiny_model, prompts, shard_size=4)
    cfg.update(task_runner="dask", workers=2)
    cfg = GenerateFeedbackConfig.model_validate(cfg).model_dump(mode="json")
    with prefect_session():
        result = with_runner(generate_feedback, "dask", 2)(config=cfg)
    pids = {read_manifest(p)["provenance"].get("pid") for p in (tmp_path / "dask" / "shards").glob("samples-*")}
    assert len(list((tmp_path / "dask" / "shards").glob("samples-*"))) == 2
    assert os.getpid() not in pids  # generation ran in the Dask worker processes
    plain_rows = read_dataset(plain["samples"]).sort_by([("prompt_id", "ascending"), ("response", "ascending")])
    dask_rows = read_dataset(result["samples"]).sort_by([("prompt_id", "ascending"), ("response", "ascending")])
    assert plain_rows.select(["prompt_id", "response", "reward"]).equals(
        dask_rows.select(["prompt_id", "response", "reward"]))



def test_align_from_prompts_one_iteration(tmp_path, toy_world, prefect_server):
    """A reduced align_from_prompts (1 iteration, few prompts) as a Prefect flow, then a rerun that resumes."""
    from prefect.client.orchestration import get_client

    from alignflow.flows.align import align_from_prompts
    from alignflow.flows.runtime import prefect_session

    out = tmp_path / "align"
    cfg = load_config("align", ROOT / "flows/configs/demo.yaml", [
        f"model={toy_world.path}", f"output={out}", "n_prompts=24", "iterations=1", "eval.n_prompts=12",
        "generation.shard_size=12", "train.max_steps=4", "train.batch_size=4", "name=ci-align"])
    cfg.toy_world = {}
    with prefect_session():
        first = align_from_prompts(config=cfg.model_dump(mode="json"), return_state=True)
    report = first.result()
    assert [h["iteration"] for h in report["history"]] == [0, 1]
    it = report["history"][1]
    pairs = verify_dataset(it["dataset"])
    assert pairs["kind"] == "pairwise" and pairs["num_rows"] == it["rows"] > 0
    with_ref = read_dataset(out / "iter-1" / "pairwise-ref")
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(with_ref.column_names)
    assert (out / "iter-1" / "model" / "config.json").exists() and Path(report["plot"]).stat().st_size > 1000
    assert np.isfinite(it["kl"]) and 0.0 <= it["reward"] <= 1.0
    assert it["termination"]["n"] == 12 and "p_value" in it["termination"]
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert "iter-1-pairwise" in keys

    # A rerun of the finished run folder resumes from its outputs. Prefect keeps no cache and no
    # results (flows/tasks.py: NO_CACHE, persist_result=False), so it runs every task again, and
    # its own records show it: every task run Completed, none Cached. The work is skipped by the
    # steps, each returning the output it finds: nothing in the run folder is rewritten but the
    # report and its plot, the same report comes back, and the task runs take a fraction of the
    # first run's time (the first trains and generates; the rerun reads manifests).
    before = _mtimes(out)
    with prefect_session():
        state = align_from_prompts(config=cfg.model_dump(mode="json"), return_state=True)
    again = state.result()
    assert again["history"] == report["history"]
    changed = {p for p, t in _mtimes(out).items() if before.get(p) != t}
    assert changed <= {"report.json", "reward_kl.png"}, changed
    # 11 task runs: eval prompts, evaluation of iteration 0, train prompts, 2 shards generated and
    # judged, merge, reference log-probs, training, evaluation of iteration 1.
    first_runs, reruns = (_task_runs(s.state_details.flow_run_id, 11) for s in (first, state))
    assert len(first_runs) == len(reruns) == 11
    assert {r.state.name for r in reruns} == {"Completed"}
    assert sorted(r.name.rsplit("-", 1)[0] for r in reruns) == sorted(r.name.rsplit("-", 1)[0] for r in first_runs)
    took = [sum(r.total_run_time.total_seconds() for r in runs) for runs in (first_runs, reruns)]
    assert took[1] < 0.1 * took[0], took


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _task_runs(flow_run_id, count: int) -> list:
    """The task runs of a flow run as Prefect's API records them, once ``count`` have finished."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Prefect 3 reports task runs to the API through events, so the records arrive a moment after
    # the flow returns, some not yet created and some still Pending or Running: wait (at most 30 s)
    # for the expected number, all finished; on time-out the caller's asserts show what came.
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            names = {r.state.name if r.state else "Pending" for r in runs}
            if len(runs) >= count and not names & {"Pending", "Running"} or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def test_a_rerun_resumes_from_the_outputs_and_a_lost_output_is_recomputed(tmp_path, fake_backend, prefect_server):
    """generate_feedback (4 shards) run twice into one folder: the rerun is Completed in every task
    run (Prefect has no cache to hit) and does no work (no generator call, no file rewritten,
    the same stats); with one shard's outputs and the merged datasets gone (what a kill during
    that shard leaves), the next rerun generates exactly that shard and ends with the datasets
    of the first run, byte for byte."""
    import shutil

    prompts = _prompts(tmp_path / "prompts", 8)
    words = [m[0]["content"] for m in read_dataset(prompts).column("prompt").to_pylist()]
    cfg = _feedback_config(tmp_path, prompts)
    run = Path(cfg.output)
    first = _run_generate_feedback(cfg)
    stats = first.result()
    assert len(fake_backend["calls"]) == 4
    files = _mtimes(run)

    fake_backend["calls"].clear()
    second = _run_generate_feedback(cfg)
    assert second.result() == stats and fake_backend["calls"] == []
    assert _mtimes(run) == files
    runs = _task_runs(second.state_details.flow_run_id, 4 + 4 + 1)
    assert len(runs) == len(_task_runs(first.state_details.flow_run_id, 4 + 4 + 1)) == 4 + 4 + 1
    assert {r.state.name for r in runs} == {"Completed"}

    merged_shards = {name: read_manifest(run / name)["shards"] for name in ("samples", "pairwise")}
    shutil.rmtree(run / "shards" / "samples-00002")
    shutil.rmtree(run / "shards" / "scored-00002")
    for merged in ("samples", "pairwise", "feedback.json"):
        (shutil.rmtree if (run / merged).is_dir() else Path.unlink)(run / merged)
    third = _run_generate_feedback(cfg)
    assert fake_backend["calls"] == [(words[4], words[5])]  # shard 2 alone
    assert third.result() == stats
    assert {name: read_manifest(run / name)["shards"] for name in merged_shards} == merged_shards  # sha256 each


def test_a_rerun_with_a_changed_input_makes_that_step_and_the_later_ones_again(tmp_path, fake_backend,
                                                                               prefect_server):
    """One run folder, four runs: a changed feedback rule remakes only the merge; a changed
    sampling temperature remakes every shard; other prompts written at the same path remake
    everything from them. An unchanged step is never redone, and a changed one never returns
    its old output (which resuming from outputs alone did: the old shards came back)."""
    prompts = _prompts(tmp_path / "prompts", 8)
    cfg = _feedback_config(tmp_path, prompts)
    run = Path(cfg.output)
    first = _run_generate_feedback(cfg).result()
    assert len(fake_backend["calls"]) == 4 and first["kind"] == "pairwise"

    fake_backend["calls"].clear()
    shard_files = {p: t for p, t in _mtimes(run).items() if p.startswith("shards/")}
    as_binary = {"judge": "verifier", "kind": "binary"}
    binary = _run_generate_feedback(_feedback_config(tmp_path, prompts, feedback=as_binary))
    assert fake_backend["calls"] == [] and binary.result()["kind"] == "binary"
    assert {p: t for p, t in _mtimes(run).items() if p.startswith("shards/")} == shard_files
    record = json.loads(next((run / ".alignflow" / "steps").glob("build_feedback-*.json")).read_text())
    assert record["inputs"]["kind"] == "binary"

    hotter = dict(cfg.generation.model_dump(), temperature=0.5)
    _run_generate_feedback(_feedback_config(tmp_path, prompts, generation=hotter, feedback=as_binary)).result()
    assert len(fake_backend["calls"]) == 4  # every shard sampled again

    fake_backend["calls"].clear()
    from alignflow.feedback.toy_task import ToyTask

    other = ToyTask().prompts(8, seed=11)
    write_dataset(prompts, pa.table({"prompt": other}), "prompts", overwrite=True)
    last = _run_generate_feedback(_feedback_config(tmp_path, prompts, generation=hotter, feedback=as_binary)).result()
    sampled = {w for call in fake_backend["calls"] for w in call}
    assert sampled == {m[-1]["content"] for m in read_dataset(prompts).column("prompt").to_pylist()}
    merged = read_dataset(last["samples"]).column("prompt").to_pylist()
    assert {m[-1]["content"] for m in merged} == sampled  # nothing of the first prompts is left


def test_critique_revise_steps_on_a_tiny_model(tmp_path, tiny_model):
    """critique_revise's steps (plain calls): a critiques trace and an sft dataset of revisions."""
    from alignflow.flows.config import CritiqueReviseConfig
    from alignflow.flows.critique_revise import run_critique_revise

    prompts = _prompts(tmp_path / "prompts", 4)
    cfg = CritiqueReviseConfig.model_validate({
        "output": str(tmp_path / "cai"), "model": tiny_model, "prompts": prompts, "rounds": 1,
        "generation": {"max_new_tokens": 6, "shard_size": 2, "device": "cpu"}})
    out = run_critique_revise(cfg, tasks.PlainSteps(cfg.output))
    trace, sft = read_dataset(out["critiques"]), read_dataset(out["sft"])
    assert trace.num_rows == 4 and sft.num_rows == out["rows"] and out["rows"] + out["quarantined"] == 4
    assert all(len(r) == 1 for r in trace.column("rounds").to_pylist())
    assert verify_dataset(out["sft"])["kind"] == "sft"
