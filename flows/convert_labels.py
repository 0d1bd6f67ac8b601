"""``convert_labels``: the Prefect flow around ``feedback.labels`` (human labels between formats).

Three coarse tasks, so a run stays a handful of task runs whatever the file size:

1. ``check_source``  - the formats exist, the file is readable, its sha256 (provenance);
2. ``convert``       - the streaming conversion (read -> validate -> convert kinds -> write),
                       returning the accounting (read = written + quarantined + dropped-by-rule);
3. ``verify_output`` - the written dataset's checksums and row count (store outputs), or the
                       export file's size.

The work is in plain functions (``check_source_fn`` ...), which the tests call directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task


def check_source_fn(source: str, from_format: str, to_format: str) -> dict:
    """Fail early (one line) on an unknown format or a missing input; returns source facts."""
    from alignflow.feedback.labels import LabelsError, get_format
    from alignflow.feedback.labels.convert import target_kind
    from alignflow.schemas.store import sha256_file

    src, dst = get_format(from_format), get_format(to_format)
    target_kind(dst)
    path = Path(source)
    if not path.exists():
        raise LabelsError(f"{path}: no such file")
    return {"source": str(path), "from": src.name, "to": dst.name,
            "sha256": sha256_file(path) if path.is_file() else None}


def convert_fn(source: str, out: str, from_format: str, to_format: str, options: dict,
               quarantine: str | None = None, overwrite: bool = False) -> dict:
    from alignflow.feedback.labels import Options, convert_labels_file

    report = convert_labels_file(source, out, from_format, to_format, Options(**options),
                                 quarantine_path=quarantine, flow="convert_labels", overwrite=overwrite)
    return {"line": report.line(), "details": report.details(), **report.as_dict(), "output": report.output,
            "quarantine": report.quarantine_path,
            "agreement": report.info.get("agreement"),
            "intransitive_prompts": len(report.info.get("intransitive_prompts") or [])}


def verify_output_fn(out: str) -> dict:
    from alignflow.schemas.store import is_dataset, verify_dataset

    if is_dataset(out):
        manifest = verify_dataset(out)
        return {"kind": manifest["kind"], "rows": manifest["num_rows"], "verified": True}
    return {"file": out, "bytes": Path(out).stat().st_size, "verified": Path(out).is_file()}


check_source = task(check_source_fn, name="check-source")
convert = task(convert_fn, name="convert")
verify_output = task(verify_output_fn, name="verify-output")


@flow(name="convert-labels", log_prints=False, validate_parameters=False)
def convert_labels(source: str, out: str | None = None, from_format: str = "pairwise", to_format: str = "pairwise",
                   strategy: str = "all-pairs", ties: str = "drop", aspect: str | None = None,
                   aggregate: str = "majority", threshold: float | None = None, top_k: int = 1,
                   style: str | None = None, quarantine: str | None = None, output: str | None = None,
                   fields: str | None = None, multi_turn: str = "quarantine",
                   max_field_mb: float = 16.0, overwrite: bool = False) -> dict[str, Any]:
    """Convert a label file between formats and kinds; returns the accounting and output facts.

    ``out`` defaults to ``<output>/<to_format>`` (``output`` is the run folder when run from a
    config file). ``overwrite``: replace an existing output dataset of the same kind.
    """
    if out is None:
        if output is None:
            raise ValueError("convert_labels needs out (or output, the run folder)")
        out = str(Path(output) / to_format)
    facts = check_source(source, from_format, to_format)
    options = {"strategy": strategy, "ties": ties, "aspect": aspect, "aggregate": aggregate,
               "threshold": threshold, "top_k": top_k, "style": style, "fields": fields, "multi_turn": multi_turn,
               "max_field_mb": max_field_mb}
    result = convert(source, out, from_format, to_format, options, quarantine, overwrite)
    result["verify"] = verify_output(result["output"])
    result["source_sha256"] = facts["sha256"]
    return result
