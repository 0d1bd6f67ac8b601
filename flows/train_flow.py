"""``train``: one training stage (reference log-probs, then the chosen loss) as a flow.

Also the entry point each process of a multi-process run executes:
``accelerate launch ... -m flows.train_flow --worker SPEC.json`` (see
``flows.tasks.launch_distributed``); the spec holds dataset, model, output and the train config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from alignflow.flows.config import TrainFlowConfig
from alignflow.flows.runtime import expand_output
from alignflow.flows.tasks import PlainSteps, PrefectSteps


def run_train(config: TrainFlowConfig, steps: PlainSteps) -> dict:
    """Reference columns (unless present) then training; returns the checkpoint and dataset paths."""
    from alignflow.schemas.store import read_manifest

    run = Path(config.output).resolve()
    dataset = str(config.dataset)
    columns = read_manifest(dataset).get("columns", {})
    if not any(c.startswith("ref_") for c in columns):
        kind = read_manifest(dataset)["kind"]
        dataset = steps.call("precompute_reference", out=str(run / f"{kind}-ref"), dataset=dataset,
                             reference=str(config.reference or config.model))
    model = steps.call("train_policy", out=str(run / "model"), dataset=dataset, model=str(config.model),
                       train=config.train.model_dump(), seed=config.train.seed)
    return {"model": model, "dataset": dataset}


_PROGRESS: list = [None]


@flow(name="train", log_prints=False, validate_parameters=False)
def train(config: dict[str, Any]) -> dict:
    """Reference log-probs (when the dataset lacks them) and training with the chosen loss."""
    cfg = TrainFlowConfig.model_validate(config)
    cfg.output = expand_output(cfg.output, cfg.name)
    return run_train(cfg, PrefectSteps(cfg.output, progress=_PROGRESS[0]))


def worker_main(argv: list[str]) -> int:
    """Body of one ``accelerate launch`` process: train from a spec file."""
    from alignflow.flows.tasks import run_training

    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m flows.train_flow --worker SPEC.json", file=sys.stderr)
        return 2
    try:
        run_training(json.loads(Path(argv[1]).read_text()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # join the process group's threads before the interpreter exits: left to teardown,
            # a gloo rank could die in C++ ("terminate called without an active exception")
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
