"""Column summaries of a dataset of any kind: lengths, scores, ties, counts, judge columns.

``summarize(kind, batches)`` goes over record batches once (memory: the per-row numbers only,
never the text) and returns a ``Summary`` of plain NumPy arrays and counts, which a report
draws. Every statistic is a column operation (PyArrow compute, NumPy over flattened lists).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Per-row numeric series a summary may hold, with what each measures (the report's labels).
SERIES = {
    "prompt_chars": "prompt length (characters, all turns)",
    "prompt_turns": "prompt turns",
    "chosen_chars": "chosen length (characters)",
    "rejected_chars": "rejected length (characters)",
    "length_gap": "chosen minus rejected length (characters)",
    "response_chars": "response length (characters)",
    "desirable_chars": "desirable response length (characters)",
    "undesirable_chars": "undesirable response length (characters)",
    "responses_per_row": "responses per row (K)",
    "responses_per_prompt": "responses per prompt",
    "score": "score (every response)",
    "score_spread": "score spread per row (best - worst)",
    "margin": "margin",
    "logp": "log-probability (sum)",
    "n_tokens": "response tokens",
    "judge_prob": "judge P(chosen better), position-averaged",
    "agreement": "annotator agreement",
    "annotators": "annotators per item",
    "rounds": "critique-revision rounds",
    "critique_chars": "critique length (characters)",
}
COUNTED = ("source", "model", "label", "judge_consistent", "reason", "role")  # value -> rows


@dataclass
class Summary:
    kind: str
    rows: int = 0
    series: dict[str, list[np.ndarray]] = field(default_factory=dict)
    counts: dict[str, Counter] = field(default_factory=dict)
    ties: Counter = field(default_factory=Counter)  # tie_rows, rows_with_pairs, tie_pairs, pairs, margin_zero, ...
    columns: list[str] = field(default_factory=list)

    def add(self, name: str, values) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            self.series.setdefault(name, []).append(values)

    def count(self, name: str, column: pa.ChunkedArray | pa.Array) -> None:
        counter = self.counts.setdefault(name, Counter())
        for item in pc.value_counts(column).to_pylist():
            counter[item["values"]] += item["counts"]

    def values(self, name: str) -> np.ndarray:
        parts = self.series.get(name, [])
        return np.concatenate(parts) if parts else np.zeros(0)

    def names(self) -> list[str]:
        return [n for n in SERIES if n in self.series]


def _one(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _numbers(column) -> np.ndarray:
    """A numeric (or boolean) column as float64, nulls as NaN."""
    column = _one(column)
    if pa.types.is_boolean(column.type):
        column = column.cast(pa.int8())
    return pc.fill_null(column.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)


def text_lengths(column) -> np.ndarray:
    """Characters per string (null: NaN)."""
    return _numbers(pc.utf8_length(_one(column)))


def list_lengths(column) -> np.ndarray:
    return _numbers(pc.list_value_length(_one(column)))


def _per_row_sum(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of each row's block of ``values`` (rows of ``lengths`` items; an empty row sums to 0)."""
    ends = np.cumsum(lengths)
    totals = np.concatenate([[0.0], np.cumsum(values)])
    return totals[ends] - totals[ends - lengths]


def prompt_lengths(prompt) -> tuple[np.ndarray, np.ndarray]:
    """(characters over all turns, turns) per prompt (``list<struct<role, content>>``)."""
    prompt = _one(prompt)
    turns = np.nan_to_num(list_lengths(prompt)).astype(np.int64)
    chars = np.nan_to_num(text_lengths(pc.struct_field(pc.list_flatten(prompt), "content")))
    return _per_row_sum(chars, turns), turns.astype(np.float64)


def listwise_ties(scores) -> dict[str, int]:
    """Ties in listwise score lists: rows with a tie, rows where every response ties, and the
    pairs of equal scores among all C(K, 2) pairs."""
    scores = _one(scores)
    n = len(scores)
    lengths = np.nan_to_num(list_lengths(scores)).astype(np.int64)
    flat = _numbers(pc.list_flatten(scores))
    row = np.repeat(np.arange(n), lengths)
    keep = np.isfinite(flat)
    row, flat = row[keep], flat[keep]
    order = np.lexsort((flat, row))  # equal scores of a row end up next to each other
    row, flat = row[order], flat[order]
    starts_group = np.ones(len(row), dtype=bool)
    starts_group[1:] = (row[1:] != row[:-1]) | (flat[1:] != flat[:-1])
    sizes = np.bincount(np.cumsum(starts_group) - 1) if len(row) else np.zeros(0, dtype=np.int64)
    groups = np.bincount(row[starts_group], minlength=n)  # distinct scores per row
    scored = np.bincount(row, minlength=n)
    with_pairs = scored >= 2
    return {"rows_with_pairs": int(with_pairs.sum()), "tie_rows": int((with_pairs & (groups < scored)).sum()),
            "all_tie_rows": int((with_pairs & (groups == 1)).sum()),
            "tie_pairs": int((sizes * (sizes - 1) // 2).sum()), "pairs": int((scored * (scored - 1) // 2).sum())}


def summarize(kind: str, batches: Iterable[pa.RecordBatch | pa.Table]) -> Summary:
    """One pass over ``batches`` of a dataset of ``kind`` (any kind, quarantine included)."""
    summary = Summary(kind)
    prompt_ids: Counter = Counter()
    for batch in batches:
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        if not summary.columns:
            summary.columns = table.column_names
        summary.rows += table.num_rows
        _add_batch(summary, kind, table, prompt_ids)
    if prompt_ids:
        summary.add("responses_per_prompt", np.fromiter(prompt_ids.values(), dtype=np.float64))
    return summary


def _add_batch(s: Summary, kind: str, t: pa.Table, prompt_ids: Counter) -> None:
    names = set(t.column_names)
    if "prompt" in names and pa.types.is_list(t.schema.field("prompt").type):
        chars, turns = prompt_lengths(t.column("prompt"))
        s.add("prompt_chars", chars)
        s.add("prompt_turns", turns)
        s.count("role", pc.struct_field(pc.list_flatten(_one(t.column("prompt"))), "role"))
    if kind == "pairwise":
        chosen, rejected = text_lengths(t.column("chosen")), text_lengths(t.column("rejected"))
        s.add("chosen_chars", chosen)
        s.add("rejected_chars", rejected)
        s.add("length_gap", chosen - rejected)
        margin = _numbers(t.column("margin"))
        s.add("margin", margin)
        s.ties["margin_zero"] += int((margin == 0).sum())
        s.ties["same_text"] += int(pc.sum(pc.equal(t.column("chosen"), t.column("rejected"))).as_py() or 0)
    elif kind == "listwise":
        s.add("responses_per_row", list_lengths(t.column("responses")))
        s.add("response_chars", text_lengths(pc.list_flatten(_one(t.column("responses")))))
        scores = _one(t.column("scores"))
        flat = _numbers(pc.list_flatten(scores))
        s.add("score", flat)
        lengths = np.nan_to_num(list_lengths(scores)).astype(np.int64)
        if len(flat):
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            has = lengths > 0
            hi = np.maximum.reduceat(np.nan_to_num(flat, nan=-np.inf), starts[has]) if has.any() else np.zeros(0)
            lo = np.minimum.reduceat(np.nan_to_num(flat, nan=np.inf), starts[has]) if has.any() else np.zeros(0)
            s.add("score_spread", hi - lo)
        s.ties.update(listwise_ties(scores))
    elif kind == "binary":
        label = pc.fill_null(t.column("label"), False)
        chars = text_lengths(t.column("response"))
        is_true = _numbers(label) == 1
        s.add("desirable_chars", chars[is_true])
        s.add("undesirable_chars", chars[~is_true])
    elif kind in ("samples", "sft", "critiques"):
        s.add("response_chars", text_lengths(t.column("response")))
    if kind == "samples":
        prompt_ids.update(dict(zip(*[c.to_pylist() for c in pc.value_counts(t.column("prompt_id")).flatten()])))
    if kind == "critiques" and "rounds" in names:
        rounds = _one(t.column("rounds"))
        s.add("rounds", list_lengths(rounds))
        s.add("critique_chars", text_lengths(pc.struct_field(pc.list_flatten(rounds), "critique")))
    for name in ("logp", "n_tokens", "judge_prob", "agreement", "annotators"):
        if name in names and (pa.types.is_integer(t.schema.field(name).type) or pa.types.is_floating(t.schema.field(name).type)):
            s.add(name, _numbers(t.column(name)))
    for name in COUNTED:
        if name in names and not pa.types.is_nested(t.schema.field(name).type):
            s.count(name, t.column(name))
