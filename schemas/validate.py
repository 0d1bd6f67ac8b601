"""Split any table into rows that conform to a kind and quarantined rows with a reason each.

``validate(table, kind)`` never raises on bad rows: every input row ends up either in
``valid`` (conformed to the kind's Arrow schema) or in ``quarantined`` (original row number,
reason, the row as JSON). ``len(valid) + len(quarantined) == len(table)`` always holds.
All checks are column operations (PyArrow compute); only rows that fail a type cast are
looked at one by one to say which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.schemas.kinds import ROLES, optional_type, schema_for
from alignflow.schemas.prompts import fill_prompt_ids, to_messages_array

MAX_FIELD_BYTES = 16 << 20  # one text field (a prompt turn, a response) larger than this is refused

QUARANTINE_SCHEMA = pa.schema(
    [pa.field("row", pa.int64()), pa.field("reason", pa.string()), pa.field("record", pa.string())]
)


@dataclass
class Validation:
    """Outcome of ``validate``: the usable rows and the quarantined ones (with reasons)."""

    kind: str
    valid: pa.Table
    quarantined: pa.Table
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def n_in(self) -> int:
        return self.valid.num_rows + self.quarantined.num_rows

    def summary(self) -> str:
        text = f"{self.n_in} rows: {self.valid.num_rows} valid, {self.quarantined.num_rows} quarantined"
        if self.reasons:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in self.reasons.items()) + ")"
        return text


class _Reasons:
    """Accumulates per-row reasons as boolean masks, joined only at the end."""

    def __init__(self, n: int):
        self.n = n
        self.checks: list[tuple[np.ndarray, str]] = []
        self.wrong_type = np.zeros(n, dtype=bool)  # rows already blamed on a failed cast

    def add(self, mask, reason: str) -> None:
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            self.checks.append((mask, reason))

    def bad(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=bool)
        for mask, _ in self.checks:
            out |= mask
        return out

    def reason_column(self, rows: np.ndarray) -> list[str]:
        out = [[] for _ in rows]
        for mask, reason in self.checks:
            for i in np.flatnonzero(mask[rows]):
                out[i].append(reason)
        return ["; ".join(r) for r in out]


def _combine(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _cast_column(col: pa.Array, target: pa.DataType, name: str, reasons: _Reasons) -> pa.Array:
    """Cast to ``target``; rows that cannot be cast become null and get a reason."""
    if col.type == target:
        return col
    if name == "prompt":
        try:
            return to_messages_array(col)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    else:
        try:
            return col.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    # Slow path, only for broken input: find the rows that do not cast.
    values, bad = [], np.zeros(len(col), dtype=bool)
    for i, value in enumerate(col.to_pylist()):
        try:
            if name == "prompt" and isinstance(value, str):
                value = [{"role": "user", "content": value}]
            try:
                cast = pa.array([value], target)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                cast = pa.array([value]).cast(target)  # e.g. "1.5" -> 1.5
            values.append(cast[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
            values.append(None)
            bad[i] = True
    reasons.add(bad, f"wrong type for {name} (expected {target})")
    reasons.wrong_type |= bad
    return pa.array(values, target)


def _empty_text(col: pa.Array) -> pa.Array:
    """Empty or only whitespace (Unicode's), without making a trimmed copy of every text."""
    return pc.or_(pc.utf8_is_space(col), pc.equal(pc.binary_length(col), 0))


def _check_prompt(prompt: pa.Array, reasons: _Reasons) -> None:
    lengths = pc.list_value_length(prompt)
    reasons.add(pc.equal(lengths, 0), "empty prompt")
    flat = pc.list_flatten(prompt)
    if len(flat) == 0:
        return
    parents = pc.list_parent_indices(prompt).to_numpy()
    role = pc.struct_field(flat, "role")
    content = pc.struct_field(flat, "content")
    bad_role = pc.invert(pc.fill_null(pc.is_in(role, pa.array(ROLES)), False))
    empty = pc.or_(pc.is_null(content), _empty_text(pc.fill_null(content, "")))
    for mask, reason in ((bad_role, "unknown role in prompt"), (empty, "empty text in prompt")):
        m = pc.fill_null(mask, True).to_numpy(zero_copy_only=False)
        if m.any():
            rows = np.zeros(len(prompt), dtype=bool)
            rows[parents[m]] = True
            reasons.add(rows, reason)


def _check_list_of_text(col: pa.Array, name: str, reasons: _Reasons) -> None:
    flat = pc.list_flatten(col)
    if len(flat) == 0:
        return
    parents = pc.list_parent_indices(col).to_numpy()
    empty = pc.fill_null(pc.or_(pc.is_null(flat), _empty_text(pc.fill_null(flat, ""))), True)
    m = empty.to_numpy(zero_copy_only=False)
    if m.any():
        rows = np.zeros(len(col), dtype=bool)
        rows[parents[m]] = True
        reasons.add(rows, f"empty text in {name}")


def _has_nan_in_list(col: pa.Array) -> np.ndarray:
    flat = pc.list_flatten(col)
    rows = np.zeros(len(col), dtype=bool)
    if len(flat):
        nan = pc.fill_null(pc.or_(pc.is_nan(flat), pc.is_null(flat)), True).to_numpy(zero_copy_only=False)
        rows[pc.list_parent_indices(col).to_numpy()[nan]] = True
    return rows


def _oversize(col: pa.Array, limit: int) -> np.ndarray:
    """Rows holding a text (at any depth: prompt turns, listed responses) longer than ``limit`` bytes."""
    col = _combine(col)
    typ = col.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ) \
            or pa.types.is_large_binary(typ):
        return pc.fill_null(pc.greater(pc.binary_length(col), limit), False).to_numpy(zero_copy_only=False)
    if pa.types.is_struct(typ):
        out = np.zeros(len(col), dtype=bool)
        for i in range(typ.num_fields):
            out |= _oversize(pc.struct_field(col, [i]), limit)
        return out
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        inner = _oversize(pc.list_flatten(col), limit)
        out = np.zeros(len(col), dtype=bool)
        if inner.any():
            out[pc.list_parent_indices(col).to_numpy()[inner]] = True
        return out
    return np.zeros(len(col), dtype=bool)


def _inf_in_list(col: pa.Array) -> np.ndarray:
    flat = pc.list_flatten(col)
    rows = np.zeros(len(col), dtype=bool)
    if len(flat):
        inf = pc.fill_null(pc.is_inf(flat), False).to_numpy(zero_copy_only=False)
        rows[pc.list_parent_indices(col).to_numpy()[inf]] = True
    return rows


def _range_overflows(col: pa.Array) -> np.ndarray:
    """Rows whose finite scores are so far apart that their difference (a margin) is infinite."""
    flat = pc.fill_null(pc.list_flatten(col), 0.0).to_numpy(zero_copy_only=False)
    rows = np.zeros(len(col), dtype=bool)
    finite = np.isfinite(flat)
    if not len(flat) or np.abs(flat[finite]).max(initial=0.0) < np.finfo(np.float64).max / 2:
        return rows  # no two values can be further apart than float64 holds
    parents = pc.list_parent_indices(col).to_numpy()[finite]
    hi, lo = np.full(len(col), -np.inf), np.full(len(col), np.inf)
    np.maximum.at(hi, parents, flat[finite])
    np.minimum.at(lo, parents, flat[finite])
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isinf(hi - lo) & (hi > lo)


def validate(table: pa.Table, kind: str, min_responses: int = 2, *,
             max_field_bytes: int = MAX_FIELD_BYTES) -> Validation:
    """Conform ``table`` to ``kind``: valid rows (schema order, extras kept) and quarantined rows.

    Numbers must be finite: an infinite margin or score, or listwise scores so far apart that a
    margin between them overflows float64 (1e308 and -1e308), is quarantined with its reason.
    ``min_responses``: listwise rows need this many responses (1 where each is labelled alone).
    A row with a text field larger than ``max_field_bytes`` is quarantined: no model context holds
    it, and every later stage would copy it around."""
    schema = schema_for(kind)
    n = table.num_rows
    reasons = _Reasons(n)
    columns: dict[str, pa.Array] = {}

    for fld in schema:
        if fld.name == "prompt_id":
            continue
        if fld.name not in table.column_names:
            if fld.nullable:
                columns[fld.name] = pa.nulls(n, fld.type)
            else:
                reasons.add(np.ones(n, dtype=bool), f"missing field {fld.name}")
                columns[fld.name] = pa.nulls(n, fld.type)
            continue
        col = _cast_column(_combine(table.column(fld.name)), fld.type, fld.name, reasons)
        if not fld.nullable:
            null = pc.is_null(col).to_numpy(zero_copy_only=False) & ~reasons.wrong_type
            reasons.add(null, f"null field {fld.name}")
        columns[fld.name] = col

    prompt = columns["prompt"]
    _check_prompt(prompt, reasons)
    columns["prompt_id"] = fill_prompt_ids(table.column("prompt_id") if "prompt_id" in table.column_names else None,
                                           prompt)

    for name, col in columns.items():
        if name != "prompt" and pa.types.is_string(col.type) and not schema.field(name).nullable:
            reasons.add(_empty_text(col), f"empty text in {name}")

    if kind == "pairwise":
        reasons.add(pc.equal(columns["chosen"], columns["rejected"]), "chosen == rejected")
        reasons.add(pc.is_nan(columns["margin"]), "NaN margin")
        reasons.add(pc.is_inf(columns["margin"]), "infinite margin")
    elif kind == "listwise":
        n_resp = pc.list_value_length(columns["responses"])
        n_scores = pc.list_value_length(columns["scores"])
        reasons.add(pc.not_equal(n_resp, n_scores), "responses and scores differ in length")
        if min_responses > 1:
            reasons.add(pc.less(n_resp, min_responses), "fewer than two responses")
        else:
            reasons.add(pc.less(n_resp, 1), "no responses")
        reasons.add(_has_nan_in_list(columns["scores"]), "NaN score")
        reasons.add(_inf_in_list(columns["scores"]), "infinite score")
        reasons.add(_range_overflows(columns["scores"]), "scores too far apart: a margin between them overflows float64")
        _check_list_of_text(columns["responses"], "responses", reasons)
    elif kind == "samples":
        reasons.add(pc.is_nan(columns["logp"]), "NaN logp")

    extras = {}
    for name in table.column_names:
        if name in columns:
            continue
        col = _combine(table.column(name))
        canonical = optional_type(kind, name)
        if canonical is not None and col.type != canonical:
            col = _cast_column(col, canonical, name, reasons)
        extras[name] = col

    ordered = {f.name: columns[f.name] for f in schema}
    ordered.update(extras)
    for name, col in ordered.items():
        reasons.add(_oversize(col, max_field_bytes), f"{name}: a text longer than {max_field_bytes} bytes")
    full = pa.table(ordered)
    bad = reasons.bad()
    good_idx = np.flatnonzero(~bad)
    bad_idx = np.flatnonzero(bad)
    valid = full.take(pa.array(good_idx)) if bad.any() else full
    valid = valid.cast(pa.schema([schema.field(f.name) if f.name in schema.names else f for f in valid.schema]))

    reason_texts = reasons.reason_column(bad_idx)
    counts: dict[str, int] = {}
    for mask, reason in reasons.checks:
        counts[reason] = int(mask.sum())
    quarantined = quarantine_table(take_rows(table, bad_idx), bad_idx, reason_texts)
    return Validation(kind, valid, quarantined, counts)


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)``, without the copy an empty take still makes (it joins the chunks of
    every column: 44 ms for a 10k-row Nectar batch, where a slice costs microseconds)."""
    return table.take(pa.array(rows)) if len(rows) else table.slice(0, 0)


def quarantine_table(rows: pa.Table, row_numbers, reasons: list[str], max_record_chars: int = 1 << 20) -> pa.Table:
    """Quarantine rows as (row number, reason, original row as JSON; a record longer than
    ``max_record_chars`` keeps its head and a marker)."""
    records = [json.dumps(r, default=str, ensure_ascii=False) for r in rows.to_pylist()]
    records = [r if len(r) <= max_record_chars else r[:max_record_chars] + f" ...[{len(r)} characters, cut]"
               for r in records]
    return pa.table(
        {
            "row": pa.array(np.asarray(row_numbers, dtype=np.int64)),
            "reason": pa.array(reasons, pa.string()),
            "record": pa.array(records, pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )


def _row_codes(col: pa.Array) -> list[np.ndarray]:
    """Integer arrays, one value per row each, equal for equal rows: dictionary codes of flat
    columns (exact); for lists, the length and two 64-bit polynomial hashes of the elements' codes
    (nested prompts and response lists; a collision needs two 64-bit hashes to agree)."""
    col = _combine(col)
    typ = col.type
    if pa.types.is_struct(typ):
        codes = [pc.is_valid(col).to_numpy(zero_copy_only=False).astype(np.int64)]
        for i in range(typ.num_fields):
            codes += _row_codes(pc.struct_field(col, [i]))
        return codes
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(col)
        parents = pc.list_parent_indices(col).to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])
        position = (np.arange(len(flat), dtype=np.int64) - starts[parents]).astype(np.uint64) + np.uint64(1)
        out = [lengths]
        for element in _row_codes(flat):
            value = element.astype(np.uint64) + np.uint64(2)
            for mult in (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)):
                with np.errstate(over="ignore"):
                    term = value * (mult ** position | np.uint64(1))
                row_hash = np.zeros(len(col), dtype=np.uint64)
                np.add.at(row_hash, parents, term)
                out.append(row_hash.view(np.int64))
        return out
    encoded = pc.dictionary_encode(col)
    return [pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)]


def duplicate_rows(table: pa.Table) -> np.ndarray:
    """Rows equal in every column to an earlier row (bool [rows]); column operations only."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=bool)
    codes = np.stack([c for name in table.column_names for c in _row_codes(table.column(name))], axis=1)
    _, first = np.unique(codes, axis=0, return_index=True)
    duplicate = np.ones(table.num_rows, dtype=bool)
    duplicate[first] = False
    return duplicate
