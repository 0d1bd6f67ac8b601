"""Prefect's overhead on the demo pipeline: align_from_prompts as a flow vs the same steps as
plain function calls, in the same run, on the same toy world.

    python tests/bench/bench_flow_overhead.py                      # the demo config
    python tests/bench/bench_flow_overhead.py --set iterations=1   # smaller

Both runs start from the same (pre-built, untimed) toy world, each in a fresh run folder so
nothing is a cache hit. The flow's time includes starting the embedded Prefect server (it is
part of what a user waits for); the server's start-up alone is also timed and reported.
Goal: overhead = (flow - plain) / flow <= 10% of wall time.
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
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))  # a fresh home: cold server start
    from flows.runtime import embedded_environment

    embedded_environment(work / "prefect-home")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

    from flows.config import load_config
    from flows.tasks import PlainSteps, build_world

    t0 = time.perf_counter()
    world = build_world(str(work / "toy-world"), seed=0)
    print(f"toy world: {time.perf_counter() - t0:.1f} s (untimed setup) -> {world['path']}")

    def config(name: str):
        cfg = load_config("align", args.config, [f"model={world['path']}", f"output={work / name}",
                                                 *args.overrides])
        return cfg

    from flows.align import run_align

    plain_cfg = config("plain")
    t0 = time.perf_counter()
    plain = run_align(plain_cfg, PlainSteps(plain_cfg.output))
    plain_s = time.perf_counter() - t0
    print(f"plain functions: {plain_s:.1f} s")

    from prefect.client.orchestration import get_client

    from flows.align import align_from_prompts
    from flows.runtime import prefect_session

    t0 = time.perf_counter()
    with get_client(sync_client=True) as client:  # starts the embedded server
        client.hello()
    server_s = time.perf_counter() - t0
    flow_cfg = config("flow")
    t1 = time.perf_counter()
    with prefect_session():
        flow = align_from_prompts(config=flow_cfg.model_dump(mode="json"))
    flow_body_s = time.perf_counter() - t1
    flow_s = server_s + flow_body_s
    print(f"Prefect flow: {flow_s:.1f} s (server start-up {server_s:.1f} s + flow {flow_body_s:.1f} s)")

    same = [round(h["reward"], 6) for h in plain["history"]] == [round(h["reward"], 6) for h in flow["history"]]
    overhead = (flow_s - plain_s) / flow_s
    warm = (flow_body_s - plain_s) / flow_body_s
    print(f"same rewards per iteration: {same}")
    print(f"overhead incl. server start: {overhead:+.1%} of the flow's wall time "
          f"(flow/plain = {flow_s / plain_s:.3f}); goal <= 10%: {'met' if overhead <= 0.10 else 'NOT met'}")
    print(f"overhead with a running server: {warm:+.1%} (flow/plain = {flow_body_s / plain_s:.3f})")


if __name__ == "__main__":
    main()
