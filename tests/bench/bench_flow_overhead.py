"""Prefect's overhead on the demo pipeline: the same steps as plain function calls vs
``alignflow demo``'s way (``flows.runtime.run_flow``: align_from_prompts as a Prefect flow on the
embedded server), in the same run.

    python tests/bench/bench_flow_overhead.py                      # the demo config
    python tests/bench/bench_flow_overhead.py --set iterations=1   # smaller

Each side builds its own toy world and runs in a fresh run folder, so nothing is a cache hit.
The flow side includes everything Prefect costs a user: starting the embedded server (cold:
a fresh PREFECT_HOME; it starts in a background thread while the toy world builds), task and
flow-run bookkeeping, result persistence. Reported: wall time of each, the server's start-up,
and overhead = (flow - plain) / flow. Goal: <= 10% of wall time.

Wall time on a shared 2-core machine swings with other jobs' load, so CPU seconds are reported
too (this process's threads plus its child processes, the Prefect server included): they show
what Prefect costs independent of the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "flows/configs/demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value override")
    parser.add_argument("--workdir", default=None, help="Where runs go (default: a temp folder).")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-flow-"))
    from alignflow.flows.runtime import embedded_environment

    embedded_environment(work / "prefect-home")  # a fresh home: cold server start
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")

    import psutil

    from alignflow.flows.align import prepare_outside_flow, run_align
    from alignflow.flows.config import load_config
    from alignflow.flows.tasks import PlainSteps

    me = psutil.Process()

    def cpu_seconds() -> float:
        """CPU time of this process and its live children (the embedded server)."""
        total = sum(me.cpu_times()[:2])
        for child in me.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return total

    def config(name: str):
        return load_config("align", args.config, [f"output={work / name}", *args.overrides])

    plain_cfg = config("plain")
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    prepare_outside_flow(plain_cfg)
    world_s = time.perf_counter() - t0
    plain = run_align(plain_cfg, PlainSteps(plain_cfg.output))
    plain_s = time.perf_counter() - t0
    plain_cpu = cpu_seconds() - c0
    print(f"plain functions: {plain_s:.1f} s (toy world {world_s:.1f} s + align {plain_s - world_s:.1f} s)")

    import alignflow.flows.runtime as runtime

    server_s = {}
    start = runtime.start_embedded_server

    def timed_start():
        t = time.perf_counter()
        start()
        server_s["s"] = time.perf_counter() - t

    runtime.start_embedded_server = timed_start
    flow_cfg = config("flow")
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    flow = runtime.run_flow("align", flow_cfg)
    flow_s = time.perf_counter() - t0
    flow_cpu = cpu_seconds() - c0
    print(f"Prefect flow: {flow_s:.1f} s (embedded server start-up {server_s.get('s', 0):.1f} s, "
          "in a background thread while the toy world builds)")

    same = [round(h["reward"], 6) for h in plain["history"]] == [round(h["reward"], 6) for h in flow["history"]]
    overhead = (flow_s - plain_s) / flow_s
    print(f"same held-out rewards per iteration: {same}")
    print(f"overhead: {overhead:+.1%} of the flow's wall time (flow/plain = {flow_s / plain_s:.3f}); "
          f"goal <= 10%: {'met' if overhead <= 0.10 else 'NOT met'}")
    print(f"CPU seconds: plain {plain_cpu:.1f}, flow {flow_cpu:.1f} (incl. the server process); "
          f"Prefect's CPU share {(flow_cpu - plain_cpu) / flow_cpu:+.1%}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
