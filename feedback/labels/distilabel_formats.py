"""Outputs of distilabel's AI-feedback tasks (argilla-io/distilabel, ``src/distilabel/steps/tasks``).

- ``UltraFeedback`` (``ultrafeedback.py``): input columns ``instruction`` and ``generations``
  (list of texts), output ``ratings`` (one per generation, null where the judge's answer was
  not parsed), ``rationales`` and ``model_name``. Read as ratings of the aspect ``rating``.
- ``PrometheusEval`` (``prometheus_eval.py``): ``mode="absolute"`` rates one ``generation``
  (``result`` 1-5), ``mode="relative"`` compares two ``generations`` (``result`` "A" = the
  first wins, "B" = the second); ``result`` is null where the judge's answer was not parsed
  (those rows are quarantined). Absolute rows become ratings grouped by instruction, relative
  rows pairs.

The labels are an AI judge's: pairs made from them have ``source = ai``. ``--fields`` renames
the columns (``instruction=``, ``generations=``, ``ratings=``, ``generation=``, ``result=``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels.columns import Quarantine, as_prompt, col, require, text, text_list
from alignflow.feedback.labels.conversions import ASPECT_PREFIX
from alignflow.feedback.labels.errors import LabelsError
from alignflow.feedback.labels.formats import (
    Format,
    Parsed,
    ReadContext,
    _finish,
    _float,
    _pairwise,
    _ratings_by_prompt,
    _rows,
    register,
)
from alignflow.feedback.labels.trainer_formats import _single_turn
from alignflow.schemas.prompts import prompt_ids


def _names(ctx: ReadContext, fmt: Format) -> dict[str, str]:
    unknown = sorted(set(ctx.fields) - set(fmt.fields))
    if unknown:
        raise LabelsError(f"--fields: {', '.join(unknown)} not known to {fmt.name} (it takes: {', '.join(fmt.fields)})")
    return {name: ctx.fields.get(name, name) for name in fmt.fields}



def read_distilabel_ultrafeedback(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """``instruction``, ``generations`` [K] and ``ratings`` [K] -> ratings (aspect ``rating``)."""
    f = _names(ctx, ULTRAFEEDBACK)
    require(raw, [f["instruction"], f["generations"], f["ratings"]], ctx)
    q = Quarantine(raw, ctx.row_offset)
    generations, g_len = text_list(raw, f["generations"])
    ratings = col(raw, f["ratings"])
    if not (pa.types.is_list(ratings.type) or pa.types.is_null(ratings.type)):
        raise LabelsError(f"{ctx.path}: row 0: field {f['ratings']!r}: expected a list of numbers, got {ratings.type}")
    r_len = pc.list_value_length(ratings).fill_null(0).to_numpy(zero_copy_only=False) \
        if pa.types.is_list(ratings.type) else np.zeros(len(raw), dtype=np.int64)
    q.add(g_len != r_len, f"{f['generations']} and {f['ratings']} differ in length")
    keep = ~q.bad
    # rows whose lengths differ are emptied so the lists stay aligned; they are quarantined
    lengths = np.where(keep, g_len, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    g_keep = np.repeat(keep, g_len)
    values = _float(pc.list_flatten(ratings)) if pa.types.is_list(ratings.type) else np.zeros(0)
    r_keep = np.repeat(keep, r_len)
    prompt = as_prompt(text(raw, f["instruction"]))
    table = pa.table({
        "prompt_id": prompt_ids(prompt), "prompt": prompt,
        "responses": pa.ListArray.from_arrays(offsets, generations.filter(pa.array(g_keep))),
        ASPECT_PREFIX + "rating": pa.ListArray.from_arrays(offsets, pa.array(values[r_keep], pa.float64(),
                                                                             from_pandas=True)),
        "_row": _rows(ctx, len(raw)), "_nrec": pa.array(np.ones(len(raw), np.int64))})
    return _finish("ratings", table, q)


def export_distilabel_ultrafeedback(table: pa.Table, options: dict) -> pa.Table:
    """Listwise rows as UltraFeedback's columns: ``instruction``, ``generations``, ``ratings``
    (the scores), and ``system_prompt`` where a prompt has one."""
    system, user = _single_turn(col(table, "prompt"), "distilabel's instruction")
    out = {"instruction": user, "generations": col(table, "responses"), "ratings": col(table, "scores")}
    if system.null_count < len(system):
        out["system_prompt"] = system
    return pa.table(out)


def read_distilabel_prometheus(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """PrometheusEval rows: relative (``generations`` + ``result`` A/B) -> pairwise; absolute
    (``generation`` + ``result`` 1-5) -> ratings grouped by instruction."""
    f = _names(ctx, PROMETHEUS)
    q = Quarantine(raw, ctx.row_offset)
    if f["generations"] in raw.column_names:
        require(raw, [f["instruction"], f["result"]], ctx)
        generations, n = text_list(raw, f["generations"])
        pair = n == 2
        q.add(~pair, f"{f['generations']} is not a list of two")
        starts = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
        first = generations.take(pa.array(np.where(pair, starts, 0))) if len(generations) else pa.nulls(len(raw), pa.string())
        second = generations.take(pa.array(np.where(pair, starts + 1, 0))) if len(generations) else pa.nulls(len(raw), pa.string())
        result = pc.utf8_trim_whitespace(text(raw, f["result"])).to_numpy(zero_copy_only=False)
        q.add(~np.isin(result, ["A", "B"]), f"{f['result']} not A or B (the judge's answer was not parsed)")
        a_wins = pa.array(result == "A")
        chosen, rejected = pc.if_else(a_wins, first, second), pc.if_else(a_wins, second, first)
        return _finish("pairwise", _pairwise(as_prompt(text(raw, f["instruction"])), chosen, rejected, ctx), q)
    require(raw, [f["instruction"], f["generation"], f["result"]], ctx)
    score = _float(col(raw, f["result"]))
    q.add(np.isnan(score), f"{f['result']} not a number (the judge's answer was not parsed)")
    prompts = text(raw, f["instruction"]).to_numpy(zero_copy_only=False)
    table = _ratings_by_prompt(prompts, q, text(raw, f["generation"]), score, "score", ctx)
    return Parsed("ratings", table, q.table())


def export_distilabel_prometheus(table: pa.Table, options: dict) -> pa.Table:
    """Pairs as PrometheusEval relative rows: ``instruction``, ``generations`` [chosen, rejected], ``result`` A."""
    _, user = _single_turn(col(table, "prompt"), "distilabel's instruction")
    both = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * table.num_rows + 1, 2, dtype=np.int32)),
                                    pa.concat_arrays([col(table, "chosen"), col(table, "rejected")]).take(
                                        pa.array(np.arange(2 * table.num_rows).reshape(2, -1).T.ravel())))
    return pa.table({"instruction": user, "generations": both, "result": pa.array(["A"] * table.num_rows, pa.string())})


ULTRAFEEDBACK = register(Format(
    "distilabel-ultrafeedback", "ratings", "ratings; distilabel UltraFeedback task output: instruction, generations, "
    "ratings (null = not parsed) -> listwise (aspect rating)", read_distilabel_ultrafeedback,
    export_distilabel_ultrafeedback, default_aspect="rating", source="ai",
    fields=("instruction", "generations", "ratings")))
PROMETHEUS = register(Format(
    "distilabel-prometheus", "pairwise", "pairwise (relative: generations + result A/B) or ratings (absolute: "
    "generation + result 1-5); distilabel PrometheusEval output", read_distilabel_prometheus,
    export_distilabel_prometheus, streaming=False, default_aspect="score", source="ai",
    fields=("instruction", "generation", "generations", "result")))
