"""How flows run: the embedded Prefect default, signal handling and the task-runner option.

With no ``PREFECT_API_URL`` configured, Prefect starts an ephemeral local API over SQLite the
first time a flow talks to it. ``embedded_environment`` points that database at a
project-local home (``./.prefect`` or a folder under the run directory) and turns off what
costs time offline (analytics, shipping logs to the API). It must run *before* ``prefect`` is
imported, because Prefect reads its settings from the environment at import time.

``prefect_session`` wraps a flow call: the flow-run heartbeat is disabled (an environment
variable cannot set it to None) and SIGTERM becomes ``SystemExit`` so the embedded server is
shut down by Prefect's normal exit path instead of being orphaned. Against SIGKILL (or any
death that runs no cleanup), ``guard_embedded_server`` starts a small watchdog process that
stops the server once its parent is gone.

Measured costs behind these choices: ../shared/notes/prefect.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

TASK_RUNNERS = ("threads", "dask", "ray")


def uses_embedded_server() -> bool:
    """True when no Prefect API is configured, i.e. flows use the ephemeral local server."""
    return not os.environ.get("PREFECT_API_URL")


def embedded_environment(home: str | os.PathLike | None = None) -> dict[str, str]:
    """Set the environment for the embedded Prefect default; returns what was set.

    Only fills variables the user has not set. ``home`` defaults to ``./.prefect`` (in the
    current directory, so nothing lands in the user's global ``~/.prefect``). Has no effect on
    ``PREFECT_HOME`` when a server is configured through ``PREFECT_API_URL``.
    """
    wanted = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
        # A local SQLite server answers in milliseconds; do not wait long for a crashed one.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }
    if uses_embedded_server():
        wanted["PREFECT_HOME"] = str(Path(home or Path.cwd() / ".prefect").resolve())
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    if "PREFECT_HOME" in applied:
        Path(applied["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if "prefect" in sys.modules and applied.get("PREFECT_HOME"):
        # Prefect already read its settings; the new home only applies to a fresh process.
        applied["warning"] = "prefect was imported before embedded_environment(); PREFECT_HOME not applied"
    return applied


def _raise_system_exit(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while inside, so cleanup (server stop) runs."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def prefect_session() -> Iterator[None]:
    """Context for calling flows: no heartbeat thread, SIGTERM exits cleanly.

    The heartbeat costs ~1 s per flow run and is only useful with a remote server watching
    for zombie runs; it stays on when ``PREFECT_API_URL`` points at a real server.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if uses_embedded_server() else {}
    with sigterm_exits(), temporary_settings(updates=updates):
        yield


def make_task_runner(kind: str = "threads", workers: int = 2):
    """A Prefect task runner: ``threads`` (default), ``dask`` (local cluster) or ``ray``.

    ``dask`` starts a local cluster of ``workers`` single-threaded worker processes (tasks
    then run in other processes: their arguments must pickle); ``ray`` starts or joins a
    local Ray runtime. Both need their extras: ``pip install alignflow[dask]`` / ``[ray]``.
    """
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(1, workers))
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:  # pragma: no cover - depends on the extra
            raise ValueError("task runner 'dask' needs prefect-dask: pip install 'alignflow[dask]'") from None
        return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, workers), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:  # pragma: no cover - depends on the extra
            raise ValueError("task runner 'ray' needs prefect-ray: pip install 'alignflow[ray]'") from None
        return RayTaskRunner(init_kwargs={"num_cpus": max(1, workers)})
    raise ValueError(f"unknown task runner {kind!r}; choose one of {', '.join(TASK_RUNNERS)}")


def with_runner(flow_obj, kind: str = "threads", workers: int = 2):
    """``flow_obj`` with the chosen task runner (the flow object itself for the default)."""
    return flow_obj.with_options(task_runner=make_task_runner(kind, workers))


# ---------------------------------------------------------------------------------------------
# Running a flow from the CLI (or a script): config -> run folder -> flow call -> result
# ---------------------------------------------------------------------------------------------

FLOWS = {  # canonical flow name -> (module, flow object)
    "align": ("alignflow.flows.align", "align_from_prompts"),
    "generate_feedback": ("alignflow.flows.generate_feedback", "generate_feedback"),
    "critique_revise": ("alignflow.flows.critique_revise", "critique_revise"),
    "train": ("alignflow.flows.train_flow", "train"),
    "convert_labels": ("alignflow.flows.convert_labels", "convert_labels"),
}
DEFAULT_RUNS = "alignflow-runs"


def expand_output(output: str | None, name: str, root: str | os.PathLike | None = None) -> str:
    """The run folder: ``output`` with ``{date}``/``{time}``/``{name}`` filled in (UTC), or
    ``<root>/<name>-<YYYYmmdd-HHMMSS>`` under ``./alignflow-runs`` when not given.

    A nightly deployment uses ``output: ./alignflow-runs/nightly-{date}``: each night gets a new
    folder, and a rerun on the same day resumes it.
    """
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    if output is None:
        return str((Path(root or DEFAULT_RUNS) / f"{name}-{now:%Y%m%d-%H%M%S}").resolve())
    return str(Path(output.format(date=f"{now:%Y-%m-%d}", time=f"{now:%H%M%S}", name=name)).expanduser().resolve())


def flow_object(flow: str):
    """The Prefect flow object of a canonical flow name (imports prefect)."""
    import importlib

    module, attr = FLOWS[flow]
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        raise ValueError(f"flow {flow!r} is not available in this checkout ({exc.name} missing)") from None


class RichProgress:
    """Rich progress bars fed by the step runners' ``(stage, done, total)`` callback."""

    def __init__(self, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        label = stage.replace("_", " ")
        if stage not in self.bars:
            self.bars[stage] = self.progress.add_task(label, total=total)
        bar = self.bars[stage]
        if done == 0:
            self.progress.reset(bar, total=total, description=label)
        self.progress.update(bar, completed=done, total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()


def start_embedded_server():
    """Start the embedded Prefect server (if no PREFECT_API_URL) and wait until it answers."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.hello()
    guard_embedded_server()


# The watchdog: polls its parent; when the parent is gone (re-parented to init or a subreaper),
# it stops the server, if the pid still names the process started then (same start time).
_WATCHDOG = """
import os, signal, sys, time
parent, child, started = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
while os.getppid() == parent:
    if start_time(child) != started:
        sys.exit(0)
    time.sleep(0.2)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    if start_time(child) != started:
        break
    os.kill(child, sig)
    deadline = time.time() + wait
    while time.time() < deadline and start_time(child) == started:
        time.sleep(0.1)
"""


def _proc_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def guard_process(pid: int) -> subprocess.Popen | None:
    """Start a watchdog that stops process ``pid`` (SIGTERM, then SIGKILL) when this process
    dies, however it dies. Linux (/proc); elsewhere nothing is started."""
    import subprocess

    started = _proc_start_time(pid)
    if started is None:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid), started],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)


def guard_embedded_server() -> None:
    """Make the embedded Prefect server die with this process (a SIGKILL leaves it orphaned
    otherwise, holding its port and SQLite database)."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # pragma: no cover - prefect's layout changed: no guard, as before
        return
    server = SubprocessASGIServer._instances.get(None)
    process = getattr(server, "server_process", None)
    if process is None or process.poll() is not None or getattr(server, "_alignflow_guard", None):
        return
    server._alignflow_guard = guard_process(process.pid)


def run_flow(flow: str, config, *, progress=None) -> Any:
    """Call a flow on a validated config (pydantic model) with its task runner, embedded default.

    ``config.output`` must already be the run folder (``expand_output``). ``progress`` is a
    ``(stage, done, total)`` callback (e.g. ``RichProgress``).

    The embedded server takes 10-20 s to start on 2 cores. It starts in a background thread
    while this thread does the flow's preparation that needs no API (importing the flow; for
    ``align`` without a model, building the toy world: the same cached step the flow then
    finds finished), so the user does not wait for both one after the other.
    """
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    embedded_environment()
    report = progress or (lambda stage, done, total: None)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-server") as pool:
        server = pool.submit(start_embedded_server) if uses_embedded_server() else None
        flow_obj = flow_object(flow)
        module = importlib.import_module(FLOWS[flow][0])
        prepare = getattr(module, "prepare_outside_flow", None)
        if prepare is not None:
            prepare(config, report)
        if server is not None:
            server.result()
    if hasattr(module, "_PROGRESS"):
        module._PROGRESS[0] = progress
    runner = with_runner(flow_obj, getattr(config, "task_runner", "threads"), getattr(config, "workers", 2))
    try:
        with prefect_session():
            if flow == "convert_labels":
                return runner(**config.model_dump(mode="json", exclude={"name"}))
            return runner(config=config.model_dump(mode="json"))
    finally:
        if hasattr(module, "_PROGRESS"):
            module._PROGRESS[0] = None


# ---------------------------------------------------------------------------------------------
# Deployments (prefect.yaml) without a server
# ---------------------------------------------------------------------------------------------

def read_deployments(path: str | os.PathLike = "prefect.yaml") -> list[dict]:
    """The ``deployments`` entries of a prefect.yaml file."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return list(data.get("deployments") or [])


def load_deployments(path: str | os.PathLike = "prefect.yaml", names: list[str] | None = None) -> list:
    """Runner deployments (``flow.to_deployment``) of prefect.yaml, with their schedules.

    Needs no server: what ``alignflow serve`` hands to ``prefect.serve``, and what the test
    checks. Entrypoints are ``path/to/file.py:flow`` relative to the file's folder.
    """
    import importlib

    root = Path(path).resolve().parent
    out = []
    for spec in read_deployments(path):
        if names and spec["name"] not in names:
            continue
        file, _, attr = spec["entrypoint"].partition(":")
        module = ".".join(Path(file).with_suffix("").parts)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        flow_obj = getattr(importlib.import_module(module), attr)
        schedules = []
        for sched in spec.get("schedules") or []:
            schedules.append(_schedule(sched))
        out.append(flow_obj.to_deployment(name=spec["name"], description=spec.get("description"),
                                          tags=spec.get("tags"), parameters=spec.get("parameters") or {},
                                          schedules=schedules or None))
    return out


def _schedule(spec: dict):
    from prefect.schedules import Cron, Interval

    if "cron" in spec:
        return Cron(spec["cron"], timezone=spec.get("timezone", "UTC"))
    if "interval" in spec:
        import datetime as dt

        return Interval(dt.timedelta(seconds=float(spec["interval"])), timezone=spec.get("timezone", "UTC"))
    raise ValueError(f"schedule {spec}: expected cron or interval")
