"""The label formats: a reader per format (raw table -> canonical rows) and exporters.

A reader gets one raw batch (a table as the file has it) and returns ``Parsed``: canonical
rows of one kind (``pairwise``, ``listwise``, ``binary``, ``sft`` or ``ratings`` = listwise
with per-aspect score lists in columns ``aspect:<name>``), the raw rows it refused (with a
reason each) and the records it dropped by rule. Canonical rows carry ``_row`` (source row of
their first record) and ``_nrec`` (records merged into them), and pairwise rows may carry
``tie`` and ``both_bad``. Readers of formats that group records across the file
(``streaming=False``) get the whole file as one batch.

Exporters take canonical rows of the format's kind and return the table to write.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.feedback.labels import aggregate as agg
from alignflow.feedback.labels.columns import (
    Quarantine,
    as_prompt,
    canonical_messages,
    col,
    expect,
    first_present,
    interleave_turns,
    item_field,
    item_text,
    last_and_rest,
    one_message,
    require,
    same_messages,
    text,
)
from alignflow.feedback.labels.conversions import ASPECT_PREFIX, parse_aspect
from alignflow.feedback.labels.errors import LabelsError
from alignflow.feedback.labels.text import (
    continuation_text,
    helpsteer_turns,
    join_transcripts,
    prefix_to_messages,
    split_last_turn,
)
from alignflow.schemas.kinds import MESSAGES
from alignflow.schemas.pandas_free import import_pandas
from alignflow.schemas.prompts import prompt_ids


@dataclass
class ReadContext:
    path: str
    fmt: str
    row_offset: int = 0
    aspect: str | None = None
    aggregate: str = "majority"
    fields: dict[str, str] = field(default_factory=dict)  # --fields: the format's own field options
    multi_turn: str = "quarantine"  # arena battles whose earlier turns differ: quarantine | whole
    min_responses: int = 2  # a ratings/listwise group needs this many (1 when each response is labelled alone)


@dataclass
class Parsed:
    kind: str
    table: pa.Table
    quarantine: pa.Table | None = None
    dropped: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # what the reader yields (ratings = listwise with per-aspect scores)
    holds: str  # one line for `alignflow formats`
    read: Callable[[pa.Table, ReadContext], Parsed] | None = None
    export: Callable[[pa.Table, dict], pa.Table] | None = None
    streaming: bool = True
    ties: bool = False  # can the format hold a tie
    default_aspect: str | None = None
    # who gave the labels, for pairs this format's rows become (None: the file does not say)
    source: str | None = "human"
    fields: tuple[str, ...] = ()  # the options --fields takes (names of the format's own settings)

    @property
    def export_kind(self) -> str | None:
        return self.kind if self.export else None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise LabelsError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def read_batch(fmt: Format, raw: pa.Table, ctx: ReadContext) -> Parsed:
    """``fmt.read`` with every failure as one line naming file, row and field, and a hint when
    the file's shape is that of another format (``shapes.guess``)."""
    from alignflow.feedback.labels.errors import FieldTypeError
    from alignflow.feedback.labels.shapes import hint

    try:
        return fmt.read(raw, ctx)
    except FieldTypeError as exc:
        raise LabelsError(f"{ctx.path}: row {ctx.row_offset + exc.row}: field {exc.field!r}: {exc.what}"
                          f"{hint(raw, ctx.fmt)}") from None
    except LabelsError as exc:
        raise LabelsError(f"{exc}{hint(raw, ctx.fmt, str(exc))}") from None
    except (pa.ArrowException, TypeError, KeyError, IndexError, AttributeError, ValueError, RecursionError) as exc:
        # a shape the reader does not expect (a bug to fix where a test finds one): one line, not a traceback
        last = ctx.row_offset + max(raw.num_rows - 1, 0)
        text_ = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LabelsError(f"{ctx.path}: rows {ctx.row_offset}-{last}: cannot be read as {fmt.name} "
                          f"({type(exc).__name__}: {text_[:200]}){hint(raw, ctx.fmt)}") from None


# -- building canonical tables -----------------------------------------------------------------


def _rows(ctx: ReadContext, n: int) -> pa.Array:
    return pa.array(np.arange(ctx.row_offset, ctx.row_offset + n, dtype=np.int64))


_FORMAT_SOURCE = object()


def _pairwise(prompt: pa.Array, chosen: pa.Array, rejected: pa.Array, ctx: ReadContext, *, margin=None,
              tie=None, both_bad=None, source=_FORMAT_SOURCE, extra: dict | None = None, rows=None,
              nrec=None) -> pa.Table:
    """Canonical pairwise rows; ``source`` defaults to the format's (None: unknown, left null)."""
    n = len(prompt)
    if source is _FORMAT_SOURCE:
        source = FORMATS[ctx.fmt].source if ctx.fmt in FORMATS else None
    cols = {
        "prompt_id": prompt_ids(pc.fill_null(prompt, pa.scalar([], MESSAGES))),
        "prompt": prompt,
        "chosen": chosen.cast(pa.string()),
        "rejected": rejected.cast(pa.string()),
        "margin": pa.nulls(n, pa.float64()) if margin is None else pa.array(margin, pa.float64()) if isinstance(margin, np.ndarray) else margin.cast(pa.float64()),
        "source": pa.nulls(n, pa.string()) if source is None else pa.array(np.full(n, source, dtype=object), pa.string()),
        "_row": _rows(ctx, n) if rows is None else pa.array(rows, pa.int64()),
        "_nrec": pa.array(np.ones(n, dtype=np.int64)) if nrec is None else pa.array(nrec, pa.int64()),
    }
    if tie is not None:
        cols["tie"] = pa.array(np.asarray(tie, dtype=bool))
    if both_bad is not None:
        cols["both_bad"] = pa.array(np.asarray(both_bad, dtype=bool))
    cols.update(extra or {})
    return pa.table(cols)


def _pick(a_wins: np.ndarray, a: pa.Array, b: pa.Array) -> tuple[pa.Array, pa.Array]:
    mask = pa.array(np.asarray(a_wins, dtype=bool))
    return pc.if_else(mask, a, b), pc.if_else(mask, b, a)


def _finish(kind: str, table: pa.Table, quarantine: Quarantine, raw_keep: np.ndarray | None = None, **kw) -> Parsed:
    """Drop the rows the quarantine took from ``table`` (aligned 1:1 with the raw batch)."""
    keep = ~quarantine.bad
    if raw_keep is not None:
        keep &= raw_keep
    if not keep.all():
        table = table.filter(pa.array(keep))
    return Parsed(kind, table, quarantine.table(), **kw)


def _float(c: pa.Array) -> np.ndarray:
    """Numbers (or numeric text, "N/A" -> NaN) as float64; anything else (an object, a list) is NaN."""
    if pa.types.is_nested(c.type) or pa.types.is_binary(c.type) or pa.types.is_temporal(c.type):
        return np.full(len(c), np.nan)
    if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
        s = pc.utf8_trim_whitespace(c)
        numeric = pc.match_substring_regex(s, r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
        c = pc.if_else(pc.fill_null(numeric, False), s, pa.scalar(None, pa.string())).cast(pa.float64())
    elif pa.types.is_boolean(c.type):
        c = c.cast(pa.int8()).cast(pa.float64())
    elif pa.types.is_null(c.type):
        c = c.cast(pa.float64())
    return pc.fill_null(c.cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)


def _bool(c: pa.Array) -> np.ndarray:
    """Booleans from bool, 0/1 or yes/no/true/false text; unknown (an object, a list) -> -1 (int8 array)."""
    if pa.types.is_nested(c.type) or pa.types.is_binary(c.type):
        return np.full(len(c), -1, dtype=np.int8)
    if pa.types.is_boolean(c.type):
        return np.where(pc.is_null(c).to_numpy(zero_copy_only=False), -1,
                        pc.fill_null(c, False).to_numpy(zero_copy_only=False).astype(np.int8)).astype(np.int8)
    s = pc.utf8_lower(pc.utf8_trim_whitespace(c.cast(pa.string())))
    yes = pc.fill_null(pc.is_in(s, pa.array(["yes", "true", "1", "1.0", "y"])), False).to_numpy(zero_copy_only=False)
    no = pc.fill_null(pc.is_in(s, pa.array(["no", "false", "0", "0.0", "n"])), False).to_numpy(zero_copy_only=False)
    return np.where(yes, 1, np.where(no, 0, -1)).astype(np.int8)


# -- hh-rlhf -----------------------------------------------------------------------------------


def read_hh(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Anthropic HH: two full transcripts; the prompt is everything before the last Assistant turn.

    Rows whose two transcripts differ before that turn are quarantined (the prompt is not
    shared); an empty final answer is quarantined by the validator ("empty text in ...").
    """
    require(raw, ["chosen", "rejected"], ctx)
    q = Quarantine(raw, ctx.row_offset)
    chosen, rejected = text(raw, "chosen"), text(raw, "rejected")
    q.add(pc.or_(pc.is_null(chosen), pc.is_null(rejected)), "null chosen or rejected")
    c_prefix, c_answer, c_ok = split_last_turn(chosen)
    r_prefix, r_answer, r_ok = split_last_turn(rejected)
    q.add(~(c_ok & r_ok), "no Assistant turn in a transcript")
    q.add(~pc.fill_null(pc.equal(c_prefix, r_prefix), False).to_numpy(zero_copy_only=False),
          "transcripts diverge before the last assistant turn")
    prompt = prefix_to_messages(c_prefix)
    table = _pairwise(prompt, c_answer, r_answer, ctx)
    return _finish("pairwise", table, q)


def export_hh(table: pa.Table, options: dict) -> pa.Table:
    return pa.table({"chosen": join_transcripts(col(table, "prompt"), col(table, "chosen")),
                     "rejected": join_transcripts(col(table, "prompt"), col(table, "rejected"))})


# -- shp ---------------------------------------------------------------------------------------


def read_shp(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Stanford Human Preferences: ``labels`` 1 = human_ref_A preferred; margin = log score_ratio."""
    require(raw, ["history", "human_ref_A", "human_ref_B", "labels"], ctx)
    expect(raw, {"labels": "number", "score_ratio": "number"})
    q = Quarantine(raw, ctx.row_offset)
    label = _float(col(raw, "labels"))
    q.add(~np.isin(label, [0.0, 1.0]), "labels not 0 or 1")
    chosen, rejected = _pick(label == 1, text(raw, "human_ref_A"), text(raw, "human_ref_B"))
    with np.errstate(divide="ignore", invalid="ignore"):  # a ratio <= 0 gives NaN: quarantined by the checks
        margin = np.log(_float(col(raw, "score_ratio"))) if "score_ratio" in raw.column_names else None
    if margin is not None:
        margin = np.where(np.isfinite(margin), margin, np.nan)
        margin = pa.array(margin, pa.float64(), from_pandas=True)
    return _finish("pairwise", _pairwise(as_prompt(text(raw, "history")), chosen, rejected, ctx, margin=margin), q)


# -- openai summarize-from-feedback comparisons ------------------------------------------------


def read_openai_comparisons(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """summarize-from-feedback: ``info`` (post), two ``summaries``, ``choice``; margin = confidence."""
    require(raw, ["info", "summaries", "choice"], ctx)
    expect(raw, {"info": "object", "summaries": "objects", "choice": "number", "extra": "object?"})
    q = Quarantine(raw, ctx.row_offset)
    info = col(raw, "info")
    names = [f.name for f in info.type] if pa.types.is_struct(info.type) else []
    if not names:
        raise LabelsError(f"{ctx.path}: row 0: field 'info': expected an object with post/title/subreddit")

    def field_or_empty(name):
        return pc.fill_null(pc.struct_field(info, name).cast(pa.string()), "") if name in names else pa.array([""] * len(raw))

    # Reddit rows hold the text in ``post``, CNN/DailyMail rows in ``article``
    body = pc.coalesce(*[pc.struct_field(info, n).cast(pa.string()) for n in ("post", "article") if n in names],
                       pa.scalar("")) if {"post", "article"} & set(names) else field_or_empty("post")
    prompt_text = pc.binary_join_element_wise(
        pc.binary_join_element_wise("SUBREDDIT: r/", field_or_empty("subreddit"), ""),
        pc.binary_join_element_wise("TITLE: ", field_or_empty("title"), ""),
        pc.binary_join_element_wise("POST: ", body, ""), "\n")
    prompt_text = pc.binary_join_element_wise(prompt_text, "\n\nTL;DR:", "")
    summaries = col(raw, "summaries")
    n_sum = pc.list_value_length(summaries).fill_null(0).to_numpy(zero_copy_only=False)
    q.add(n_sum != 2, "summaries is not a list of two")
    padded = pc.if_else(pa.array(n_sum == 2), summaries, pa.scalar([{"text": ""}, {"text": ""}], summaries.type)
                        if pa.types.is_list(summaries.type) else None)
    s0 = pc.struct_field(pc.list_element(padded, 0), "text")
    s1 = pc.struct_field(pc.list_element(padded, 1), "text")
    choice = _float(col(raw, "choice"))
    q.add(~np.isin(choice, [0.0, 1.0]), "choice not 0 or 1")
    chosen, rejected = _pick(choice == 0, s0, s1)
    margin = None
    if "extra" in raw.column_names and pa.types.is_struct(col(raw, "extra").type) and \
            "confidence" in [f.name for f in col(raw, "extra").type]:
        margin = pc.struct_field(col(raw, "extra"), "confidence").cast(pa.float64())
    return _finish("pairwise", _pairwise(as_prompt(prompt_text), chosen, rejected, ctx, margin=margin), q)


# -- ultrafeedback -----------------------------------------------------------------------------

UF_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def read_ultrafeedback(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """UltraFeedback: per completion, ratings of four aspects ("N/A" = not rated) + overall_score."""
    require(raw, ["instruction", "completions"], ctx)
    expect(raw, {"instruction": "text", "completions": "objects"})
    q = Quarantine(raw, ctx.row_offset)
    comps = col(raw, "completions")
    flat = pc.list_flatten(comps)
    fields = [f.name for f in flat.type] if pa.types.is_struct(flat.type) else []
    if "response" not in fields:
        raise LabelsError(f"{ctx.path}: row 0: field 'completions': items lack 'response'")
    offsets = pa.array(np.concatenate([[0], np.cumsum(pc.list_value_length(comps).fill_null(0).to_numpy(
        zero_copy_only=False))]).astype(np.int32))
    table = pa.table({"prompt_id": prompt_ids(as_prompt(text(raw, "instruction"))),
                      "prompt": as_prompt(text(raw, "instruction")),
                      "responses": pa.ListArray.from_arrays(offsets, pc.struct_field(flat, "response"))})
    if "annotations" in fields:
        ann = pc.struct_field(flat, "annotations")
        for aspect in UF_ASPECTS:
            if aspect in [f.name for f in ann.type]:
                rating = pc.struct_field(pc.struct_field(ann, aspect), "Rating")
                values = pa.array(_float(rating.cast(pa.string())), pa.float64(), from_pandas=True)
                table = table.append_column(ASPECT_PREFIX + aspect, pa.ListArray.from_arrays(offsets, values))
    for name, key in (("overall", "overall_score"), ("fine_grained", "fine-grained_score")):
        if key in fields:
            values = pa.array(_float(pc.struct_field(flat, key).cast(pa.string())), pa.float64(), from_pandas=True)
            table = table.append_column(ASPECT_PREFIX + name, pa.ListArray.from_arrays(offsets, values))
    table = table.append_column("_row", _rows(ctx, len(raw))).append_column("_nrec", pa.array(np.ones(len(raw), np.int64)))
    return _finish("ratings", table, q)


# -- oasst -------------------------------------------------------------------------------------

OASST_COLUMNS = ["message_id", "parent_id", "text", "role", "rank"]
# per-message scalar labels as the HF export holds them (the tree export's {label: {value, count}}
# is brought to this form): label names, mean values in [0, 1], and how many people gave each
OASST_LABELS = pa.struct([("name", pa.list_(pa.string())), ("value", pa.list_(pa.float64())),
                          ("count", pa.list_(pa.int64()))])
OASST_RANK = "rank"  # --aspect rank (or none): order siblings by their human rank
# per-message emoji reactions (+1, -1, red_flag, _skip_reply, ...) and how many people gave each
OASST_EMOJIS = pa.struct([("name", pa.list_(pa.string())), ("count", pa.list_(pa.int64()))])
EMOJI_PREFIX, DETOXIFY_PREFIX = "emoji:", "detoxify:"  # --aspect emoji:+1, --aspect detoxify:toxicity=-1


def _labels_record(value) -> dict | None:
    """One message's labels (HF lists or the tree export's dict) as ``{name, value, count}`` lists."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict) and isinstance(value.get("name"), list):
        names = value["name"]
        return {"name": names, "value": value.get("value") or [None] * len(names),
                "count": value.get("count") or [None] * len(names)}
    if isinstance(value, dict):
        items = [(k, v) for k, v in value.items() if isinstance(v, dict)]
        return {"name": [k for k, _ in items], "value": [v.get("value") for _, v in items],
                "count": [v.get("count") for _, v in items]}
    raise TypeError(f"expected an object, got {type(value).__name__}")


def _named_fields_to_lists(c: pa.Array, target: pa.StructType, leaves: dict[str, Callable[[pa.Array], np.ndarray]]) -> pa.Array:
    """A struct whose fields are names (the tree export's ``{name: ...}`` read by Arrow) -> a
    ``target`` struct of lists: ``name`` = the names a row has, and each of ``leaves`` (field ->
    its value per row from that name's sub-array). A [rows, names] grid flattened row-major:
    kernels and numpy, no per-row Python."""
    names = [f.name for f in c.type]
    n, k = len(c), len(names)
    top = c.is_valid().to_numpy(zero_copy_only=False)
    present = np.zeros((n, k), dtype=bool)
    grids = {leaf: np.zeros((n, k), dtype=target.field(leaf).type.value_type.to_pandas_dtype()) for leaf in leaves}
    for j, name in enumerate(names):
        sub = pc.struct_field(c, name)
        present[:, j] = sub.is_valid().to_numpy(zero_copy_only=False) & top
        for leaf, values_of in leaves.items():
            grids[leaf][:, j] = values_of(sub)
    keep = present.ravel()
    offsets = pa.array(np.concatenate([[0], np.cumsum(present.sum(1))]).astype(np.int32))
    arrays = [pa.array(np.tile(np.array(names, dtype=object), n)[keep], pa.string())]
    arrays += [pa.array(grids[leaf].ravel()[keep], target.field(leaf).type.value_type, from_pandas=True) for leaf in leaves]
    return pa.StructArray.from_arrays([pa.ListArray.from_arrays(offsets, a) for a in arrays], fields=list(target),
                                      mask=pa.array(~top))


def _count_of(sub: pa.Array) -> np.ndarray:
    return pc.fill_null(sub.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)


def _labels_from_dict_struct(c: pa.Array) -> pa.Array:
    """``struct<label: struct<value, count>>`` (the tree export's dict) -> OASST_LABELS."""
    def count(sub: pa.Array) -> np.ndarray:
        has_count = "count" in [f.name for f in sub.type]
        return _count_of(pc.struct_field(sub, "count")) if has_count else np.zeros(len(sub), dtype=np.int64)

    return _named_fields_to_lists(c, OASST_LABELS, {"value": lambda sub: _float(pc.struct_field(sub, "value")),
                                                    "count": count})


def oasst_labels(raw: pa.Table, ctx: ReadContext) -> pa.Array | None:
    """The ``labels`` column as OASST_LABELS (None when the file has none)."""
    if "labels" not in raw.column_names:
        return None
    c = col(raw, "labels")
    if pa.types.is_null(c.type):
        return pa.nulls(len(c), OASST_LABELS)
    try:
        if pa.types.is_struct(c.type):
            fields = {f.name: f.type for f in c.type}
            if "name" in fields and "value" in fields:
                return c.cast(OASST_LABELS)
            if fields and all(pa.types.is_struct(t) and "value" in [f.name for f in t] for t in fields.values()):
                return _labels_from_dict_struct(c)
        elif pa.types.is_string(c.type) or pa.types.is_large_string(c.type):  # JSON text (mixed-type files)
            return pa.array([_labels_record(v) for v in c.to_pylist()], OASST_LABELS)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as exc:
        raise LabelsError(f"{ctx.path}: row ?: field 'labels': {str(exc).splitlines()[0]}") from None
    raise LabelsError(f"{ctx.path}: row 0: field 'labels': expected {{name, value, count}} lists or "
                      f"{{label: {{value, count}}}} (got {c.type})")


def _emojis_record(value) -> dict | None:
    """One message's emojis (HF ``{name: [...], count: [...]}`` or the tree export's ``{emoji: n}``)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict) and isinstance(value.get("name"), list):
        return {"name": value["name"], "count": value.get("count") or [None] * len(value["name"])}
    if isinstance(value, dict):  # Arrow's JSON reader gives every message every emoji seen: None = not given
        given = {k: v for k, v in value.items() if v is not None}
        return {"name": list(given), "count": list(given.values())}
    raise TypeError(f"expected an object, got {type(value).__name__}")


def oasst_emojis(raw: pa.Table, ctx: ReadContext) -> pa.Array | None:
    """The ``emojis`` column as OASST_EMOJIS (None when the file has none)."""
    if "emojis" not in raw.column_names:
        return None
    c = col(raw, "emojis")
    if pa.types.is_null(c.type):
        return pa.nulls(len(c), OASST_EMOJIS)
    try:
        if pa.types.is_struct(c.type) and {"name", "count"} <= {f.name for f in c.type}:
            return pa.StructArray.from_arrays([pc.struct_field(c, "name"), pc.struct_field(c, "count")],
                                              fields=list(OASST_EMOJIS), mask=c.is_null()).cast(OASST_EMOJIS)
        if pa.types.is_struct(c.type) and all(pa.types.is_integer(f.type) or pa.types.is_null(f.type) for f in c.type):
            return _named_fields_to_lists(c, OASST_EMOJIS, {"count": _count_of})  # the tree export's {emoji: n}
        if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):  # JSON text (mixed-type files)
            return pa.array([_emojis_record(x) for x in c.to_pylist()], OASST_EMOJIS)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as exc:
        raise LabelsError(f"{ctx.path}: row ?: field 'emojis': {str(exc).splitlines()[0]}") from None
    raise LabelsError(f"{ctx.path}: row 0: field 'emojis': expected {{name, count}} lists or {{emoji: count}} "
                      f"(got {c.type})")


def oasst_detoxify(raw: pa.Table, ctx: ReadContext) -> pa.Array | None:
    """The ``detoxify`` column (classifier scores per message) as a struct of float64 fields."""
    if "detoxify" not in raw.column_names:
        return None
    c = col(raw, "detoxify")
    if pa.types.is_string(c.type) or pa.types.is_large_string(c.type):
        try:
            c = pa.array([json.loads(v) if v else None for v in c.to_pylist()])
        except (ValueError, pa.ArrowInvalid) as exc:
            raise LabelsError(f"{ctx.path}: row ?: field 'detoxify': {str(exc).splitlines()[0]}") from None
    if pa.types.is_null(c.type):
        return None
    if not pa.types.is_struct(c.type):
        raise LabelsError(f"{ctx.path}: row 0: field 'detoxify': expected {{score name: number}} (got {c.type})")
    try:
        fields = [pc.struct_field(c, f.name).cast(pa.float64()) for f in c.type]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise LabelsError(f"{ctx.path}: row ?: field 'detoxify': {str(exc).splitlines()[0]}") from None
    return pa.StructArray.from_arrays(fields, names=[f.name for f in c.type], mask=c.is_null())


def _emoji_counts(emojis: pa.Array, name: str) -> np.ndarray:
    """How many people gave emoji ``name`` per message. [messages]

    Emojis are reactions anyone may give: a message without this one has 0 of it, whether it
    got other reactions or none at all (the export leaves ``emojis`` null then)."""
    names = pc.struct_field(emojis, "name")
    flat_names = pc.list_flatten(names)
    hit = pc.fill_null(pc.equal(flat_names, name), False).to_numpy(zero_copy_only=False)
    out = np.zeros(len(emojis))
    parents = pc.list_parent_indices(names).to_numpy()
    out[parents[hit]] = _float(pc.list_flatten(pc.struct_field(emojis, "count")))[hit]
    return out


def _label_values(labels: pa.Array, name: str, ctx: ReadContext) -> np.ndarray:
    """The mean value of label ``name`` per message, NaN where the message lacks it. [messages]"""
    names = pc.struct_field(labels, "name")
    values = pc.struct_field(labels, "value")
    n_names = pc.list_value_length(names).fill_null(0).to_numpy(zero_copy_only=False)
    n_values = pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False)
    if (n_names != n_values).any():
        row = int(np.flatnonzero(n_names != n_values)[0]) + ctx.row_offset
        raise LabelsError(f"{ctx.path}: row {row}: field 'labels': name and value lists differ in length")
    flat_names = pc.list_flatten(names)
    hit = pc.fill_null(pc.equal(flat_names, name), False).to_numpy(zero_copy_only=False)
    out = np.full(len(labels), np.nan)
    parents = pc.list_parent_indices(names).to_numpy()
    out[parents[hit]] = _float(pc.list_flatten(values))[hit]
    return out


OASST_FLAT = pa.schema([("message_id", pa.string()), ("parent_id", pa.string()), ("text", pa.string()),
                        ("role", pa.string()), ("rank", pa.float64()), ("message_tree_id", pa.string()),
                        ("labels", OASST_LABELS), ("emojis", OASST_EMOJIS), ("detoxify", pa.string())])


def flatten_oasst_trees(raw: pa.Table, ctx: ReadContext | None = None) -> pa.Table:
    """Nested exports -> flat message rows: the tree export (one tree per line, ``prompt`` with
    recursive ``replies``) or the message export (one message per line, its ``replies`` nested,
    no tree wrapper; oasst-data's README, "Individual Messages").

    Trees are recursive, which no Arrow kernel walks; this is one pass over the messages (their
    depth is bounded by the JSON reader's nesting limit). Labels (``{label: {value, count}}``
    there) come out as the flat rows' name/value/count lists. A message that is not an object,
    or a field of the wrong type, is an error naming the line (row) and the field.
    """
    path = ctx.path if ctx else "input"
    offset = ctx.row_offset if ctx else 0
    rows = []

    def walk(message, parent: str | None, tree: str | None, line: int, where: str) -> None:
        if not isinstance(message, dict):
            raise LabelsError(f"{path}: row {line}: field {where!r}: expected an OASST message object "
                              f"({{message_id, text, role, replies}}), got {type(message).__name__}")
        for key in ("message_id", "parent_id", "text", "role"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise LabelsError(f"{path}: row {line}: field {where}.{key!r}: expected text, got "
                                  f"{type(message[key]).__name__}")
        rank = message.get("rank")
        try:
            labels, emojis = _labels_record(message.get("labels")), _emojis_record(message.get("emojis"))
        except (TypeError, ValueError) as exc:
            raise LabelsError(f"{path}: row {line}: field {where}.labels/emojis: {exc}") from None
        rows.append({"message_id": message.get("message_id"), "parent_id": parent, "text": message.get("text"),
                     "role": message.get("role"), "rank": rank if isinstance(rank, (int, float)) and not
                     isinstance(rank, bool) else None, "message_tree_id": tree, "labels": labels, "emojis": emojis,
                     "detoxify": json.dumps(message["detoxify"]) if message.get("detoxify") else None})
        replies = message.get("replies") or []
        if not isinstance(replies, list):
            raise LabelsError(f"{path}: row {line}: field {where}.replies: expected a list, got {type(replies).__name__}")
        for reply in replies:
            walk(reply, message.get("message_id"), tree, line, where + ".replies")

    def _tree_id(record: dict) -> str | None:
        tree = record.get("message_tree_id")
        return tree if isinstance(tree, str) else None  # only used to count trees

    trees = "message_id" not in raw.column_names
    for i, record in enumerate(raw.to_pylist()):
        if trees:
            if record.get("prompt") is not None:
                walk(record["prompt"], None, _tree_id(record), offset + i, "prompt")
        else:
            parent = record.get("parent_id")
            walk(record, parent if isinstance(parent, str) else None, _tree_id(record), offset + i, "message")
    try:
        return pa.Table.from_pylist(rows, schema=OASST_FLAT)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise LabelsError(f"{path}: labels or emojis of an unexpected shape ({str(exc).splitlines()[0]})") from None


def _oasst_scores(raw: pa.Table, signals: dict, assistant: np.ndarray, ctx: ReadContext):
    """What orders siblings: (score per message [n], rated mask [n], per-aspect values or None, noun).

    Default (``--aspect`` unset or ``rank``): score = -rank, rated = ranked replies. With
    ``--aspect quality`` (any label, ``rank``, ``emoji:+1``, ``detoxify:toxicity`` or a weighted
    mix ``quality=1,toxicity=-1``): score = the weighted mean of those values (as
    ``ratings_to_listwise`` computes it), rated = replies that have every one of them.
    ``mean`` is refused: OASST's signals point both ways (quality up, toxicity and spam down).
    """
    rank = _float(col(raw, "rank"))
    if ctx.aspect in (None, "", OASST_RANK):
        return -rank, assistant & ~np.isnan(rank), None, "ranked"
    pd = import_pandas()

    labels, emojis, detoxify = signals.get("labels"), signals.get("emojis"), signals.get("detoxify")

    def names_in(lists: pa.Array | None, prefix: str = "") -> list[str]:
        if lists is None:
            return []
        flat = pc.list_flatten(pc.struct_field(lists, "name")).to_numpy(zero_copy_only=False)
        return [prefix + x for x in pd.unique(flat).tolist() if x is not None]

    available = ([OASST_RANK] + [x for x in names_in(labels) if x != OASST_RANK] + names_in(emojis, EMOJI_PREFIX)
                 + ([DETOXIFY_PREFIX + f.name for f in detoxify.type] if detoxify is not None else []))
    if ctx.aspect.strip() == "mean":
        raise LabelsError(f"{ctx.path}: --aspect mean is not meaningful for oasst (quality counts up, toxicity and "
                          f"spam down); name the signals with weights, e.g. quality=1,toxicity=-1 (this file has: "
                          f"{', '.join(available)})")
    weights = parse_aspect(ctx.aspect, available, None)

    def values_of(name: str) -> np.ndarray:
        if name == OASST_RANK:
            return -rank
        if name.startswith(EMOJI_PREFIX):
            return _emoji_counts(emojis, name[len(EMOJI_PREFIX):])
        if name.startswith(DETOXIFY_PREFIX):
            return _float(pc.struct_field(detoxify, name[len(DETOXIFY_PREFIX):]))
        return _label_values(labels, name, ctx)

    values = {a: values_of(a) for a in weights}
    total = sum(w * np.where(np.isnan(values[a]), 0.0, values[a]) for a, w in weights.items())
    known = np.logical_and.reduce([~np.isnan(v) for v in values.values()])
    return total / sum(abs(w) for w in weights.values()), assistant & known, values, "rated"


def read_oasst(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """OpenAssistant messages -> listwise: a prompter turn's ranked replies, ordered by ``rank``.

    Records are messages. Written: the prompter message and its ranked replies (2 or more).
    Dropped by rule: unranked replies, prompter turns without ranked replies, groups with a
    single ranked reply. Quarantined: groups whose conversation misses an ancestor message.
    Scores are ``-rank`` (rank 0 is best). The nested tree export is flattened first.

    Per-message labels (quality, toxicity, humor, helpfulness, ... each a mean ``value`` in
    [0, 1] over ``count`` people) are kept losslessly: ``response_labels`` (one
    ``{name, value, count}`` per response) and ``prompt_labels`` (the prompter message's); so are
    emoji reactions (``response_emojis`` / ``prompt_emojis``, ``{name, count}``) and the detoxify
    classifier scores (``response_detoxify`` / ``prompt_detoxify``).
    ``--aspect LABEL`` (or ``emoji:+1``, ``detoxify:toxicity``, or a mix ``quality=1,toxicity=-1``)
    orders siblings by those signals instead of rank: then the groups are the replies having
    them all (``ratings`` rows, ``aspect:<name>``). A label or a detoxify score is missing where a
    message lacks it; an emoji never is (a reply nobody reacted to has 0 of each).
    """
    pd = import_pandas()

    records = None
    if ("prompt" in raw.column_names and "message_id" not in raw.column_names) or "replies" in raw.column_names:
        raw = flatten_oasst_trees(raw, ctx)  # the tree export, or messages with their replies nested
        records = raw.num_rows
    require(raw, OASST_COLUMNS, ctx)
    n = raw.num_rows
    q = Quarantine(raw, ctx.row_offset)
    labels = oasst_labels(raw, ctx)
    signals = {"labels": labels, "emojis": oasst_emojis(raw, ctx), "detoxify": oasst_detoxify(raw, ctx)}
    df = pd.DataFrame({
        "id": text(raw, "message_id").to_numpy(zero_copy_only=False),
        "parent": text(raw, "parent_id").to_numpy(zero_copy_only=False),
        "text": text(raw, "text").to_numpy(zero_copy_only=False),
        "role": text(raw, "role").to_numpy(zero_copy_only=False),
    })
    role = df.role.to_numpy()
    score, rated, aspect_values, noun = _oasst_scores(raw, signals, role == "assistant", ctx)
    dropped: Counter = Counter()
    group_size = df[rated].groupby("parent").size()
    in_group = rated & (df.parent.map(group_size).fillna(0).to_numpy() >= ctx.min_responses)
    parent_ids = pd.Index(df.parent[in_group].unique())
    # walk every group's conversation up to the root, one level per step (vectorized per level)
    index_of = pd.Series(np.arange(n), index=df.id)
    index_of = index_of[~index_of.index.duplicated()]
    parent_of = df.parent.to_numpy()
    chain = [index_of.reindex(parent_ids).to_numpy()]  # float with NaN for missing
    broken = np.isnan(chain[0])
    while True:
        cur = chain[-1]
        alive = ~np.isnan(cur)
        nxt = np.full(len(cur), np.nan)
        if alive.any():
            pid = parent_of[cur[alive].astype(np.int64)]
            has_parent = pd.notna(pid)
            found = index_of.reindex(pid[has_parent]).to_numpy()
            tmp = np.full(alive.sum(), np.nan)
            tmp[has_parent] = found
            broken[np.flatnonzero(alive)[has_parent]] |= np.isnan(found)
            nxt[alive] = tmp
        if np.isnan(nxt).all():
            break
        chain.append(nxt)
    depth = np.array(chain)  # [levels, groups], level 0 = the direct parent
    group_code = pd.Index(parent_ids).get_indexer(df.parent.where(in_group))
    member_broken = np.zeros(n, dtype=bool)
    member_broken[in_group] = broken[group_code[in_group]]
    q.add(member_broken, "conversation incomplete: an ancestor message is not in the file")
    good_groups = ~broken
    # prompts: the chain read root-first
    levels, G = depth.shape
    turn_idx = depth[::-1].T  # [groups, levels], root first, NaN padding at the front
    valid = ~np.isnan(turn_idx)
    counts = valid.sum(1)
    flat_idx = turn_idx[valid].astype(np.int64)
    roles = np.where(role[flat_idx] == "prompter", "user", "assistant")
    msgs = pa.StructArray.from_arrays([pa.array(roles.astype(object), pa.string()),
                                       pa.array(df.text.to_numpy()[flat_idx], pa.string(), from_pandas=True)], names=["role", "content"])
    prompt = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), msgs,
                                      type=MESSAGES)
    members = np.flatnonzero(in_group)
    order = members[np.lexsort((-score[members], group_code[members]))]  # best first (stable on ties)
    sizes = np.bincount(group_code[order], minlength=G)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    parent_row = np.nan_to_num(depth[0], nan=-1).astype(np.int64)

    def per_response(values) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, values.take(pa.array(order)) if isinstance(values, pa.Array)
                                        else pa.array(values[order], pa.float64(), from_pandas=True))

    columns = {"prompt_id": prompt_ids(prompt), "prompt": prompt,
               "responses": per_response(pa.array(df.text.to_numpy(), pa.string(), from_pandas=True))}
    if aspect_values is None:
        columns["scores"] = per_response(score)
    else:
        columns.update({ASPECT_PREFIX + a: per_response(v) for a, v in aspect_values.items()})
    prompt_row = pa.array(np.where(parent_row >= 0, parent_row, 0))
    for name, values in signals.items():  # carried along losslessly, per response and for the prompter turn
        if values is not None:
            columns[f"response_{name}"] = per_response(values)
            columns[f"prompt_{name}"] = values.take(prompt_row)
    columns["_row"] = pa.array(np.where(parent_row >= 0, parent_row, 0) + ctx.row_offset)
    columns["_nrec"] = pa.array(sizes + (parent_row >= 0))
    table = pa.table(columns).filter(pa.array(good_groups))
    # records not written: count them by rule
    used = np.zeros(n, dtype=bool)
    used[in_group] = True
    used[parent_row[(parent_row >= 0)]] = True
    used |= q.bad
    is_parent_broken = np.zeros(n, dtype=bool)
    is_parent_broken[parent_row[(parent_row >= 0) & broken]] = True
    q.add(is_parent_broken, "conversation incomplete: an ancestor message is not in the file")
    rest = ~used
    plain_labels = aspect_values is not None and not any(a.startswith((EMOJI_PREFIX, DETOXIFY_PREFIX)) for a in aspect_values)
    what = "rank" if aspect_values is None else ("label " if plain_labels else "") + "+".join(aspect_values)
    dropped["unranked reply" if aspect_values is None else f"reply without {what}"] = int(
        (rest & (role == "assistant") & ~rated).sum())
    dropped[f"single {noun} reply (no ranking)"] = int((rest & rated).sum())
    dropped[f"prompter turn without {noun} replies"] = int((rest & (role != "assistant")).sum())
    dropped = +dropped
    return Parsed("listwise" if aspect_values is None else "ratings", table, q.table(), dropped,
                  info={"message_trees": int(pd.Series(raw.column("message_tree_id").to_numpy()).nunique())
                        if "message_tree_id" in raw.column_names else None, "records": records})


# -- nectar ------------------------------------------------------------------------------------


def _hh_prompt(prompt_text: pa.Array) -> pa.Array:
    """An HH-style prompt (``\\n\\nHuman: ...\\n\\nAssistant:``) as messages; plain text = one turn."""
    has_marker = pc.fill_null(pc.match_substring(prompt_text, "Human:"), False)
    prefix, _, ok = split_last_turn(prompt_text)
    prefix = pc.if_else(pa.array(ok), prefix, prompt_text)
    msgs = prefix_to_messages(prefix)
    return pc.if_else(has_marker, msgs, as_prompt(prompt_text))


def read_nectar(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Nectar: 7 ``answers`` with ``rank`` 1 (best) .. 7; scores = -rank."""
    require(raw, ["prompt", "answers"], ctx)
    expect(raw, {"prompt": "text", "answers": "objects"})
    q = Quarantine(raw, ctx.row_offset)
    answers = col(raw, "answers")
    lengths = pc.list_value_length(answers).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    rank = _float(item_field(answers, "rank", "answers"))
    prompt = _hh_prompt(text(raw, "prompt"))
    table = pa.table({"prompt_id": prompt_ids(pc.fill_null(prompt, pa.scalar([], MESSAGES))), "prompt": prompt,
                      "responses": pa.ListArray.from_arrays(offsets, item_text(answers, "answer", "answers")),
                      "scores": pa.ListArray.from_arrays(offsets, pa.array(-rank, pa.float64(), from_pandas=True)),
                      "_row": _rows(ctx, len(raw)), "_nrec": pa.array(np.ones(len(raw), np.int64))})
    return _finish("listwise", table, q)


# -- helpsteer2 --------------------------------------------------------------------------------

HS2_ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def read_helpsteer2(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """HelpSteer2: the attribute file (one rated response per row, grouped by prompt into
    per-aspect ratings) or the preference file (``preference_strength`` -3..3, negative =
    response_1 better, 0 = tie; margin = |strength|). Multi-turn prompts hold the earlier
    turns inline (``<extra_id_1>Assistant`` / ``<extra_id_1>User`` lines); they become
    message lists, the response answering the last user turn."""
    pd = import_pandas()

    if "preference_strength" in raw.column_names:
        require(raw, ["prompt", "response_1", "response_2", "preference_strength"], ctx)
        q = Quarantine(raw, ctx.row_offset)
        s = _float(col(raw, "preference_strength"))
        q.add(np.isnan(s) | (np.abs(s) > 3), "preference_strength not in -3..3")
        chosen, rejected = _pick(s <= 0, text(raw, "response_1"), text(raw, "response_2"))
        table = _pairwise(helpsteer_turns(text(raw, "prompt")), chosen, rejected, ctx, margin=np.abs(s), tie=s == 0)
        return _finish("pairwise", table, q)
    require(raw, ["prompt", "response", "helpfulness"], ctx)
    q = Quarantine(raw, ctx.row_offset)
    prompt_text = text(raw, "prompt").to_numpy(zero_copy_only=False)
    codes, uniques = pd.factorize(prompt_text)
    q.add(codes < 0, "null prompt")
    keep = np.flatnonzero(codes >= 0)
    order = keep[np.argsort(codes[keep], kind="stable")]
    sizes = np.bincount(codes[order], minlength=len(uniques))
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    first = np.full(len(uniques), len(raw), dtype=np.int64)
    np.minimum.at(first, codes[keep], keep)
    prompt = helpsteer_turns(pa.array(uniques.astype(object), pa.string()))
    table = pa.table({"prompt_id": prompt_ids(prompt), "prompt": prompt,
                      "responses": pa.ListArray.from_arrays(offsets, text(raw, "response").take(pa.array(order)))})
    for aspect in HS2_ASPECTS:
        if aspect in raw.column_names:
            values = pa.array(_float(col(raw, aspect))[order], pa.float64(), from_pandas=True)
            table = table.append_column(ASPECT_PREFIX + aspect, pa.ListArray.from_arrays(offsets, values))
    table = table.append_column("_row", pa.array(first + ctx.row_offset)).append_column("_nrec", pa.array(sizes.astype(np.int64)))
    return Parsed("ratings", table, q.table())


# -- pku-saferlhf ------------------------------------------------------------------------------


def read_pku(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """PKU-SafeRLHF: ``--aspect helpfulness`` (better_response_id, default) or ``safety``
    (safer_response_id) as pairwise; ``--aspect is_safe`` gives per-response safety as binary."""
    require(raw, ["prompt", "response_0", "response_1"], ctx)
    q = Quarantine(raw, ctx.row_offset)
    aspect = ctx.aspect or "helpfulness"
    prompt = as_prompt(text(raw, "prompt"))
    if aspect == "is_safe":
        require(raw, ["is_response_0_safe", "is_response_1_safe"], ctx)
        s0, s1 = _bool(col(raw, "is_response_0_safe")), _bool(col(raw, "is_response_1_safe"))
        q.add((s0 < 0) | (s1 < 0), "is_response_*_safe not true/false")
        keep = ~q.bad
        idx = np.flatnonzero(keep)
        rows2 = np.repeat(idx, 2)
        first = np.tile([True, False], len(idx))
        response = pc.if_else(pa.array(first), text(raw, "response_0").take(pa.array(rows2)),
                              text(raw, "response_1").take(pa.array(rows2)))
        label = np.where(first, s0[rows2], s1[rows2]).astype(bool)
        p2 = prompt.take(pa.array(rows2))
        nrec = np.tile([1, 0], len(idx))  # a record's two rows count it once
        table = pa.table({"prompt_id": prompt_ids(p2), "prompt": p2, "response": response, "label": pa.array(label),
                          "_row": pa.array(rows2 + ctx.row_offset), "_nrec": pa.array(nrec.astype(np.int64))})
        return Parsed("binary", table, q.table())
    column = {"helpfulness": "better_response_id", "safety": "safer_response_id"}.get(aspect)
    if column is None:
        raise LabelsError(f"{ctx.path}: unknown aspect {aspect!r} for pku-saferlhf (helpfulness, safety, is_safe)")
    require(raw, [column], ctx)
    better = _float(col(raw, column))
    q.add(~np.isin(better, [0.0, 1.0]), f"{column} not 0 or 1")
    chosen, rejected = _pick(better == 0, text(raw, "response_0"), text(raw, "response_1"))
    return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)


# -- chatbot arena -----------------------------------------------------------------------------

ARENA_WINNERS = {"model_a": 1, "model_b": -1, "tie": 0, "tie (bothbad)": 0}


def _json_lists(raw: pa.Table, names: list[str]) -> pa.Table:
    """Columns holding JSON-encoded lists (the arena CSV) parsed by Arrow's JSON reader at once
    (columns that are lists already, as in a JSON file, are taken as they are)."""
    import pyarrow.json as pjson

    if all(pa.types.is_list(col(raw, n).type) for n in names):
        return pa.table({f"c{i}": col(raw, n).cast(pa.list_(pa.string())) for i, n in enumerate(names)})
    parts = []
    for i, name in enumerate(names):
        value = pc.fill_null(text(raw, name), "null")
        parts.append(pc.binary_join_element_wise(f'"c{i}":', value, ""))
    lines = pc.binary_join_element_wise(*parts, ",")
    lines = pc.binary_join_element_wise("{", lines, "}", "")
    data = "\n".join(lines.to_pylist()).encode()
    schema = pa.schema([(f"c{i}", pa.list_(pa.string())) for i in range(len(names))])
    return pjson.read_json(pa.BufferReader(data), parse_options=pjson.ParseOptions(explicit_schema=schema))


def read_arena(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Chatbot Arena: ``winner`` model_a / model_b / tie / tie (bothbad) over two conversations,
    or the one-hot CSV (``winner_model_a``, ``winner_model_b``, ``winner_tie``; prompt and
    responses as JSON lists of turns). Rows whose conversations differ before the final answer
    (multi-turn, each model saw its own earlier answers) are quarantined; with ``--multi-turn
    whole`` each becomes one pair of whole conversations (``whole_pairs``)."""
    q = Quarantine(raw, ctx.row_offset)
    if "winner_model_a" in raw.column_names:
        require(raw, ["prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"], ctx)
        expect(raw, {"prompt": "text|list", "response_a": "text|list", "response_b": "text|list",
                     "winner_model_a": "number", "winner_model_b": "number", "winner_tie": "number"})
        try:
            parsed = _json_lists(raw, ["prompt", "response_a", "response_b"])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise LabelsError(f"{ctx.path}: row {ctx.row_offset}: field 'prompt': a batch whose prompt/response columns "
                              f"are not JSON lists of strings ({str(exc).splitlines()[0]})") from None
        conv_a, ok_a = interleave_turns(parsed.column("c0").combine_chunks(), parsed.column("c1").combine_chunks())
        conv_b, ok_b = interleave_turns(parsed.column("c0").combine_chunks(), parsed.column("c2").combine_chunks())
        q.add(~(ok_a & ok_b), "prompt and response lists differ in length")
        wa, wb, wt = (_float(col(raw, c)) for c in ("winner_model_a", "winner_model_b", "winner_tie"))
        one_hot = (wa + wb + wt == 1) & np.isin(wa, [0, 1]) & np.isin(wb, [0, 1])
        q.add(~one_hot, "winner columns are not one-hot")
        grade = np.where(wa == 1, 1, np.where(wb == 1, -1, 0))
        both_bad = np.zeros(len(raw), dtype=bool)
    else:
        require(raw, ["winner", "conversation_a", "conversation_b"], ctx)
        expect(raw, {"conversation_a": "messages", "conversation_b": "messages", "winner": "text"})
        conv_a, conv_b = col(raw, "conversation_a"), col(raw, "conversation_b")
        winner = text(raw, "winner").to_numpy(zero_copy_only=False)
        known = np.isin(winner, list(ARENA_WINNERS))
        q.add(~known, "winner not model_a / model_b / tie / tie (bothbad)")
        grade = np.array([ARENA_WINNERS.get(w, 0) for w in winner]) if len(winner) else np.zeros(0)
        both_bad = winner == "tie (bothbad)"
    conv_a, conv_b = canonical_messages(conv_a, "conversation_a"), canonical_messages(conv_b, "conversation_b")
    prefix_a, last_a, role_a, ne_a = last_and_rest(conv_a)
    prefix_b, last_b, role_b, ne_b = last_and_rest(conv_b)
    q.add(~(ne_a & ne_b) | ~pc.fill_null(pc.equal(role_a, "assistant"), False).to_numpy(zero_copy_only=False),
          "conversation does not end with an assistant answer")
    differ = ~same_messages(prefix_a, prefix_b)
    extra = None
    if ctx.multi_turn == "whole" and differ.any():
        prompt, last_a, last_b, shared_user_turns = whole_pairs(conv_a, conv_b, prefix_a, last_a, last_b, differ)
        q.add(differ & ~shared_user_turns, "the two conversations' user turns differ")
        prefix_a = prompt
        extra = {"whole_conversation": pa.array(differ)}
    else:
        q.add(differ, "conversations differ before the final answer (--multi-turn whole keeps them)")
    chosen, rejected = _pick(grade >= 0, last_a, last_b)
    table = _pairwise(prefix_a, chosen, rejected, ctx, margin=np.abs(grade).astype(np.float64), tie=grade == 0,
                      both_bad=both_bad, extra=extra)
    return _finish("pairwise", table, q)


def whole_pairs(conv_a: pa.Array, conv_b: pa.Array, prefix: pa.Array, last_a: pa.Array, last_b: pa.Array,
                rows: np.ndarray) -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray]:
    """Multi-turn battles as pairs of whole conversations (``--multi-turn whole``), at ``rows``.

    The prompt is what both sides share (the turns before their first different message); each
    response is the rest of its side's conversation as one text: its first answer, then each
    later turn after a ``\n\nHuman:`` / ``\n\nAssistant:`` marker (the HH transcript style), so
    the preference stays about the whole conversation. The sides must differ at an answer, not
    at a user turn (the fourth value: False where they do not). Other rows are unchanged."""
    conv_a, conv_b = (c.cast(MESSAGES) if c.type != MESSAGES else c for c in (conv_a, conv_b))
    shared = common_prefix_length(conv_a, conv_b)
    prompt = _head(conv_a, shared)
    rest_a, rest_b = _tail(conv_a, shared), _tail(conv_b, shared)
    first_a = pc.struct_field(pc.list_element(_pad_messages(rest_a), 0), "role")
    first_b = pc.struct_field(pc.list_element(_pad_messages(rest_b), 0), "role")
    at_answer = (pc.fill_null(pc.equal(first_a, "assistant"), False).to_numpy(zero_copy_only=False)
                 & pc.fill_null(pc.equal(first_b, "assistant"), False).to_numpy(zero_copy_only=False))
    mask = pa.array(rows)
    return (pc.if_else(mask, prompt, prefix), pc.if_else(mask, continuation_text(rest_a), last_a),
            pc.if_else(mask, continuation_text(rest_b), last_b), at_answer | ~rows)


def common_prefix_length(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Per row, how many leading messages two message lists share (role and content equal)."""
    la = pc.list_value_length(a).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    lb = pc.list_value_length(b).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    n = np.minimum(la, lb)
    row = np.repeat(np.arange(len(n)), n)
    pos = np.arange(int(n.sum())) - np.repeat(np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    start_a, start_b = np.concatenate([[0], np.cumsum(la)[:-1]]), np.concatenate([[0], np.cumsum(lb)[:-1]])
    fa, fb = pc.list_flatten(a), pc.list_flatten(b)
    ma, mb = fa.take(pa.array(start_a[row] + pos)), fb.take(pa.array(start_b[row] + pos))
    same = (pc.fill_null(pc.equal(pc.struct_field(ma, "role"), pc.struct_field(mb, "role")), False).to_numpy(zero_copy_only=False)
            & pc.fill_null(pc.equal(pc.struct_field(ma, "content"), pc.struct_field(mb, "content")), False)
            .to_numpy(zero_copy_only=False))
    first_diff = n.copy()
    np.minimum.at(first_diff, row[~same], pos[~same])
    return first_diff


def _head(lists: pa.Array, k: np.ndarray) -> pa.Array:
    """The first ``k[i]`` messages of each row."""
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    idx = np.repeat(starts, k) + np.arange(int(k.sum())) - np.repeat(np.concatenate([[0], np.cumsum(k)[:-1]]), k)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32)),
                                    pc.list_flatten(lists).take(pa.array(idx)), type=MESSAGES)


def _tail(lists: pa.Array, k: np.ndarray) -> pa.Array:
    """Each row's messages after its first ``k[i]``."""
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    rest = np.maximum(lengths - k, 0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) + np.minimum(k, lengths)
    idx = np.repeat(starts, rest) + np.arange(int(rest.sum())) - np.repeat(np.concatenate([[0], np.cumsum(rest)[:-1]]), rest)
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(rest)]).astype(np.int32)),
                                    pc.list_flatten(lists).take(pa.array(idx)), type=MESSAGES)


def _pad_messages(lists: pa.Array) -> pa.Array:
    """Empty lists given one null message, so that element 0 exists everywhere."""
    return pc.if_else(pc.equal(pc.list_value_length(lists).fill_null(0), 0),
                      pa.scalar([{"role": None, "content": None}], MESSAGES), lists)


# -- alpaca-eval -------------------------------------------------------------------------------


def read_alpaca_eval(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """AlpacaEval annotations: ``preference`` 1 = output_1, 2 = output_2, 0 or 1.5 = draw; floats
    in [1, 2] (weighted annotators) give margin = 2 |p - 1.5|."""
    require(raw, ["instruction", "output_1", "output_2", "preference"], ctx)
    expect(raw, {"preference": "number"})
    q = Quarantine(raw, ctx.row_offset)
    p = _float(text(raw, "preference") if not pa.types.is_floating(col(raw, "preference").type) and
               not pa.types.is_integer(col(raw, "preference").type) else col(raw, "preference"))
    valid = (p == 0) | ((p >= 1) & (p <= 2))
    q.add(~valid, "preference not 0, 1, 2 or in [1, 2]")
    tie = (p == 0) | (p == 1.5)
    chosen, rejected = _pick(p <= 1.5, text(raw, "output_1"), text(raw, "output_2"))
    with np.errstate(over="ignore", invalid="ignore"):  # preferences out of range are quarantined above
        margin = np.where(tie, 0.0, 2 * np.abs(p - 1.5))
    table = _pairwise(as_prompt(text(raw, "instruction")), chosen, rejected, ctx, margin=margin, tie=tie)
    return _finish("pairwise", table, q)


# -- graded pairwise (Tulu human-eval sheet) --------------------------------------------------

GRADES = {"a-is-better": 2, "a-is-slightly-better": 1, "tie": 0, "b-is-slightly-better": -1, "b-is-better": -2}


def read_graded(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Graded pairwise labels, several annotators per item (the Tulu human-eval sheet).

    Grades a-is-better 2 .. b-is-better -2 (0 = tie). Items (prompt + unordered pair of
    completions) are aggregated by ``ctx.aggregate`` (majority or mean); margin = strength;
    inter-annotator agreement goes to ``info``. Blank rows are dropped by rule. ``--aspect
    acceptable`` gives per-completion binary labels from ``completion_*_is_acceptable``
    (majority of the annotators; a split vote is dropped by rule).
    """
    require(raw, ["prompt", "completion_a", "completion_b", "preference"], ctx)
    q = Quarantine(raw, ctx.row_offset)
    pref = text(raw, "preference")
    blank = np.ones(len(raw), dtype=bool)
    for name in raw.column_names:
        blank &= pc.is_null(col(raw, name)).to_numpy(zero_copy_only=False)
    dropped = Counter({"blank row": int(blank.sum())}) if blank.any() else Counter()
    keep = ~blank
    pref_np = pc.utf8_trim_whitespace(pref).to_numpy(zero_copy_only=False)
    known = np.isin(pref_np, list(GRADES))
    q.add(keep & ~known, "preference not one of " + ", ".join(GRADES))
    for name in ("prompt", "completion_a", "completion_b"):
        q.add(keep & pc.is_null(col(raw, name)).to_numpy(zero_copy_only=False), f"null {name}")
    use = np.flatnonzero(keep & ~q.bad)
    prompt_all = as_prompt(text(raw, "prompt"))
    if ctx.aspect == "acceptable":
        return _graded_acceptable(raw, ctx, q, use, prompt_all, dropped)
    grade = np.array([GRADES[p] for p in pref_np[use]], dtype=np.float64)
    pid = prompt_ids(prompt_all.take(pa.array(use))).to_numpy(zero_copy_only=False)
    a = text(raw, "completion_a").take(pa.array(use)).to_numpy(zero_copy_only=False)
    b = text(raw, "completion_b").take(pa.array(use)).to_numpy(zero_copy_only=False)
    result = agg.aggregate_graded(pid, a, b, grade, ctx.aggregate)
    first = use[result["first"]]
    agreement = agg.agreement(result["item"], result["label3"])
    cols = agg.graded_to_pairwise_columns(result)
    table = _pairwise(prompt_all.take(pa.array(first)), cols["chosen"], cols["rejected"], ctx, margin=cols["margin"],
                      tie=cols["tie"].to_numpy(zero_copy_only=False), rows=first + ctx.row_offset, nrec=result["annotators"],
                      extra={"annotators": cols["annotators"], "agreement": cols["agreement"]})
    info = {"agreement": agreement.as_dict(), "agreement_summary": agreement.summary(),
            "items": int(len(first)), "aggregate": ctx.aggregate}
    return Parsed("pairwise", table, q.table(), dropped, info)


def _graded_acceptable(raw, ctx, q, use, prompt_all, dropped) -> Parsed:
    pd = import_pandas()

    require(raw, ["completion_a_is_acceptable", "completion_b_is_acceptable"], ctx)
    ok_a, ok_b = _bool(col(raw, "completion_a_is_acceptable")), _bool(col(raw, "completion_b_is_acceptable"))
    pid = prompt_ids(prompt_all.take(pa.array(use))).to_numpy(zero_copy_only=False)
    resp = np.concatenate([text(raw, "completion_a").take(pa.array(use)).to_numpy(zero_copy_only=False),
                           text(raw, "completion_b").take(pa.array(use)).to_numpy(zero_copy_only=False)])
    vote = np.concatenate([ok_a[use], ok_b[use]]).astype(np.float64)
    src = np.concatenate([use, use])
    known = vote >= 0
    item, uniques = pd.factorize(pd.MultiIndex.from_arrays([np.concatenate([pid, pid])[known], resp[known]]))
    yes = np.bincount(item, weights=vote[known], minlength=len(uniques))
    total = np.bincount(item, minlength=len(uniques))
    first = np.full(len(uniques), len(raw), dtype=np.int64)
    np.minimum.at(first, item, src[known])
    split = yes * 2 == total
    # records: each sheet row rates two responses; credit the row to the item of its first
    # response with a known vote (so each record is counted once)
    item_full = np.full(len(vote), -1, dtype=np.int64)
    item_full[known] = item
    credit = np.where(item_full[: len(use)] >= 0, item_full[: len(use)], item_full[len(use):])
    nrec = np.bincount(credit[credit >= 0], minlength=len(uniques)).astype(np.int64)
    if split.any():
        dropped["acceptability split evenly"] += int(nrec[split].sum())
    keep = ~split
    pr = prompt_all.take(pa.array(first[keep]))
    table = pa.table({"prompt_id": prompt_ids(pr), "prompt": pr,
                      "response": pa.array(np.asarray(uniques.get_level_values(1), dtype=object)[keep], pa.string()),
                      "label": pa.array((yes * 2 > total)[keep]),
                      "_row": pa.array(first[keep] + ctx.row_offset), "_nrec": pa.array(nrec[keep]),
                      "annotators": pa.array(total[keep].astype(np.int64))})
    # rows whose both votes are unknown are counted nowhere above: drop them by rule
    unknown_rows = int((~known[: len(use)] & ~known[len(use):]).sum())
    if unknown_rows:
        dropped["acceptability not yes/no"] += unknown_rows
    return Parsed("binary", table, q.table(), dropped, {"items": int(keep.sum())})


# -- argilla -----------------------------------------------------------------------------------

PROMPT_FIELDS = ("prompt", "instruction", "input", "question", "text")
RESPONSE_FIELDS = ("response", "completion", "output", "answer", "generation")


def _argilla_values(cell, status=None):
    """An Argilla question cell -> the submitted values (v2: a list, with the statuses of the
    ``.responses.status`` column beside it; v1: ``[{user_id, value, status}]``). Drafts and
    discarded answers are left out; an answer without a status counts."""
    if cell is None:
        return []
    if isinstance(cell, dict):
        cell = [cell]
    if not isinstance(cell, list):
        cell = [cell]
    statuses = status if isinstance(status, list) and len(status) == len(cell) else [None] * len(cell)
    out = []
    for v, st in zip(cell, statuses):
        if isinstance(v, dict) and "value" in v and ("status" in v or "user_id" in v):
            st = v.get("status", st)
            v = v["value"]
        if st in (None, "submitted"):
            out.append(v)
    return out


def _argilla_flatten(raw: pa.Table) -> pa.Table:
    """Argilla v2's nested export (``records.to_json`` / ``to_disk``: ``fields``, ``responses``
    {question: [{value, user_id, status}]}, ``suggestions``, ``metadata``) -> the flat columns
    of its ``to_datasets`` export (fields as columns, ``<question>.responses`` with the statuses
    in ``<question>.responses.status``)."""
    rows = []
    for rec in raw.to_pylist():
        fields = rec.get("fields") if isinstance(rec.get("fields"), dict) else {}
        row = {k: (v if isinstance(v, str) or v is None else json.dumps(v)) for k, v in fields.items()}
        responses = rec.get("responses") if isinstance(rec.get("responses"), dict) else {}
        for question, answers in responses.items():
            answers = answers if isinstance(answers, list) else []
            row[f"{question}.responses"] = json.dumps([a.get("value") if isinstance(a, dict) else a for a in answers])
            row[f"{question}.responses.status"] = json.dumps([a.get("status") if isinstance(a, dict) else None
                                                              for a in answers])
        rows.append(row)
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({n: pa.array([r.get(n) for r in rows], pa.string()) for n in names}) if names else pa.table({})


def _json_cells(c: pa.Array) -> list:
    """Cells of a question column: Python values (JSON text, as the flattened nested export holds, decoded)."""
    values = c.to_pylist()
    if pa.types.is_string(c.type):
        out = []
        for v in values:
            try:
                out.append(json.loads(v) if v is not None else None)
            except ValueError:
                out.append(v)
        return out
    return values


def read_argilla(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Argilla exports: v2 flat (``to_datasets``/``to_hub``: fields as columns, answers in
    ``<question>.responses`` with ``.responses.users`` and ``.responses.status``), v2 nested
    (``to_json``/``to_disk``: ``fields`` + ``responses``) or v1 (``[{user_id, value, status}]``).

    Only submitted answers count (drafts and discarded ones are left out). A rating question
    (one response field per record, several annotators: mean) gives ratings grouped by prompt;
    a ranking question (values name response fields, in order best first or with ``rank`` 1 =
    best, several annotators: mean rank) gives listwise rows. ``--aspect`` names the question.
    Nested annotator lists are unpacked in Python (one pass over the records).
    """
    if "fields" in raw.column_names and "responses" in raw.column_names:
        raw = _argilla_flatten(raw)
    prompt_col = first_present(raw, PROMPT_FIELDS)
    if prompt_col is None:
        raise LabelsError(f"{ctx.path}: row 0: field 'prompt': missing (argilla needs one of {', '.join(PROMPT_FIELDS)}; "
                          f"the file has: {', '.join(raw.column_names) or 'no columns'})")
    questions = [c for c in raw.column_names if c.endswith(".responses")]
    # v1: a question column holds [{user_id, value, status}]
    questions += [c for c in raw.column_names if c not in questions and pa.types.is_list(raw.schema.field(c).type)
                  and pa.types.is_struct(raw.schema.field(c).type.value_type)
                  and "value" in [f.name for f in raw.schema.field(c).type.value_type]]
    if ctx.aspect:
        question = ctx.aspect if ctx.aspect in raw.column_names else ctx.aspect + ".responses"
        if question not in raw.column_names:
            raise LabelsError(f"{ctx.path}: row 0: field {ctx.aspect!r}: no such question (the file's questions: "
                              f"{', '.join(questions) or 'none'})")
    elif questions:
        question = questions[0]
    else:
        raise LabelsError(f"{ctx.path}: row 0: no question column: Argilla answers are in <question>.responses "
                          f"columns (v2) or [{{user_id, value, status}}] lists (v1); the file has: "
                          f"{', '.join(raw.column_names)}")
    q = Quarantine(raw, ctx.row_offset)
    statuses = _json_cells(col(raw, question + ".status")) if question + ".status" in raw.column_names else \
        [None] * raw.num_rows
    cells = [_argilla_values(c, st) for c, st in zip(_json_cells(col(raw, question)), statuses)]
    q.add(np.array([len(c) == 0 for c in cells], dtype=bool), f"no submitted answer to {question}")
    is_ranking = any(isinstance(v, (list, dict)) for c in cells for v in c)
    prompts = text(raw, prompt_col)
    name = question.removesuffix(".responses")
    if is_ranking:
        records = raw.to_pylist()
        responses, scores = [], []
        for i, (cell, rec) in enumerate(zip(cells, records)):
            ranks: dict[str, list[float]] = {}
            for answer in cell:
                items = answer if isinstance(answer, list) else [answer]
                for pos, item in enumerate(items):
                    label, rank = (item.get("value"), item.get("rank", pos + 1)) if isinstance(item, dict) else (item, pos + 1)
                    ranks.setdefault(str(label), []).append(_number(rank, pos + 1))
            names = [n for n in ranks if isinstance(rec.get(n), str)]
            if len(names) < len(ranks) and cell:
                q.add(np.eye(1, len(raw), i, dtype=bool)[0], "ranking names a field that is not in the record")
            responses.append([rec[n] for n in names])
            scores.append([-float(np.mean(ranks[n])) for n in names])
        prompt = as_prompt(prompts)
        table = pa.table({"prompt_id": prompt_ids(pc.fill_null(prompt, pa.scalar([], MESSAGES))), "prompt": prompt,
                          "responses": pa.array(responses, pa.list_(pa.string())),
                          "scores": pa.array(scores, pa.list_(pa.float64())),
                          "_row": _rows(ctx, len(raw)), "_nrec": pa.array(np.ones(len(raw), np.int64))})
        return _finish("listwise", table, q)
    resp_col = first_present(raw, RESPONSE_FIELDS)
    if resp_col is None:
        raise LabelsError(f"{ctx.path}: row 0: field 'response': missing (an argilla rating question needs one of "
                          f"{', '.join(RESPONSE_FIELDS)}; the file has: {', '.join(raw.column_names)})")
    values = [[_number(v, np.nan) for v in c] for c in cells]
    q.add(np.array([bool(c) and any(np.isnan(v) for v in c) for c in values], dtype=bool),
          f"an answer to {name} is not a number")
    mean = np.array([np.mean(c) if c else np.nan for c in values])
    table = _ratings_by_prompt(prompts.to_numpy(zero_copy_only=False), q, text(raw, resp_col), mean, name, ctx)
    return Parsed("ratings", table, q.table())


def _number(value, default: float) -> float:
    """A number from JSON (int, float or numeric text); ``default`` otherwise."""
    if isinstance(value, bool) or value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


# -- label studio ------------------------------------------------------------------------------


def _ls_results(task: dict) -> list[list[dict]]:
    """Per annotation (not cancelled), its result items (values of other types are skipped)."""
    out = []
    annotations = task.get("annotations") or task.get("completions") or []
    for ann in annotations if isinstance(annotations, list) else []:
        if isinstance(ann, dict) and not ann.get("was_cancelled"):
            result = ann.get("result")
            out.append([r for r in result if isinstance(r, dict)] if isinstance(result, list) else [])
    return out


def _texts(values: list, field: str, q: Quarantine) -> pa.Array:
    """Python values (from records read in Python) as strings; a row holding something else
    (a number, an object) is quarantined, its value left null."""
    ok = np.array([v is None or isinstance(v, str) for v in values], dtype=bool)
    q.add(~ok, f"{field} is not text")
    return pa.array([v if good else None for v, good in zip(values, ok)], pa.string())


def read_label_studio(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """Label Studio JSON export: tasks with ``data`` and ``annotations``; result types
    ``pairwise`` (selected left/right; several annotators: majority, a split vote is a tie),
    ``rating`` (mean over annotators; grouped by prompt into ratings) and ``ranker``
    (``data.items`` ordered per annotator; mean position). Tasks are read in Python (one pass);
    a task whose values are of the wrong type is quarantined."""

    require(raw, ["data", "annotations"] if "annotations" in raw.column_names or "completions" not in raw.column_names
            else ["data", "completions"], ctx)
    tasks = [t if isinstance(t.get("data"), dict) else {**t, "data": {}} for t in raw.to_pylist()]
    q = Quarantine(raw, ctx.row_offset)
    q.add(np.array([not isinstance(t.get("data"), dict) for t in raw.select(["data"]).to_pylist()], dtype=bool),
          "data is not an object")
    kinds = {r.get("type") for t in tasks for a in _ls_results(t) for r in a}
    if "pairwise" in kinds:
        prompts, chosen, rejected, grades, bad = [], [], [], [], []
        for t in tasks:
            data = t["data"]
            votes = [1 if r["value"].get("selected") == "left" else -1 for a in _ls_results(t) for r in a
                     if r.get("type") == "pairwise" and isinstance(r.get("value"), dict)]
            names = next((r.get("to_name") for a in _ls_results(t) for r in a if r.get("type") == "pairwise"), None)
            keys = names if isinstance(names, list) and all(isinstance(k, str) and k in data for k in names) else \
                [k for k in data if k not in PROMPT_FIELDS and isinstance(data[k], str)][:2]
            pkey = next((k for k in PROMPT_FIELDS if k in data), None)
            bad.append(not votes or len(keys) != 2 or pkey is None)
            left, right = (data.get(keys[0]), data.get(keys[1])) if len(keys) == 2 else (None, None)
            g = float(np.sign(sum(votes))) if votes else 0.0
            prompts.append(data.get(pkey) if pkey else None)
            chosen.append(left if g >= 0 else right)
            rejected.append(right if g >= 0 else left)
            grades.append(g)
        q.add(np.array(bad, dtype=bool), "no pairwise vote, or not a prompt and two texts in data")
        g = np.array(grades)
        table = _pairwise(as_prompt(_texts(prompts, "data.prompt", q)), _texts(chosen, "data.<left>", q),
                          _texts(rejected, "data.<right>", q), ctx, margin=np.abs(g), tie=g == 0)
        return _finish("pairwise", table, q)
    if "ranker" in kinds:
        prompts, responses, scores, bad = [], [], [], []
        for t in tasks:
            data = t["data"]
            items = {str(it.get("id")): it.get("body") or it.get("text") or it.get("html") or it.get("title")
                     for it in (data.get("items") if isinstance(data.get("items"), list) else []) if isinstance(it, dict)}
            ranks: dict[str, list[int]] = {}
            for a in _ls_results(t):
                for r in a:
                    if r.get("type") != "ranker" or not isinstance(r.get("value"), dict):
                        continue
                    ranker = r["value"].get("ranker")
                    order = ranker if isinstance(ranker, list) else next(iter(ranker.values()), []) if isinstance(ranker, dict) else []
                    for pos, item_id in enumerate(order if isinstance(order, list) else []):
                        ranks.setdefault(str(item_id), []).append(pos)
            names = [n for n in ranks if isinstance(items.get(n), str)]
            pkey = next((k for k in PROMPT_FIELDS if k in data), None)
            bad.append(len(names) < 2 or pkey is None)
            prompts.append(data.get(pkey) if pkey else None)
            responses.append([items[n] for n in names])
            scores.append([-float(np.mean(ranks[n])) for n in names])
        q.add(np.array(bad, dtype=bool), "no ranking of two or more data.items")
        prompt = as_prompt(_texts(prompts, "data.prompt", q))
        table = pa.table({"prompt_id": prompt_ids(pc.fill_null(prompt, pa.scalar([], MESSAGES))), "prompt": prompt,
                          "responses": pa.array(responses, pa.list_(pa.string())),
                          "scores": pa.array(scores, pa.list_(pa.float64())),
                          "_row": _rows(ctx, len(raw)), "_nrec": pa.array(np.ones(len(raw), np.int64))})
        return _finish("listwise", table, q)
    if "rating" in kinds:
        prompts, responses, ratings, bad = [], [], [], []
        for t in tasks:
            data = t["data"]
            values = [_number(r["value"].get("rating"), np.nan) for a in _ls_results(t) for r in a
                      if r.get("type") == "rating" and isinstance(r.get("value"), dict)]
            pkey = next((k for k in PROMPT_FIELDS if k in data), None)
            rkey = next((k for k in RESPONSE_FIELDS if k in data), None)
            bad.append(not values or any(np.isnan(values)) or pkey is None or rkey is None)
            prompts.append(data.get(pkey) if pkey else None)
            responses.append(data.get(rkey) if rkey else None)
            ratings.append(float(np.mean(values)) if values else np.nan)
        q.add(np.array(bad, dtype=bool), "no numeric rating, or no prompt and response in data")
        prompt_text = _texts(prompts, "data.prompt", q).to_numpy(zero_copy_only=False)
        table = _ratings_by_prompt(prompt_text, q, _texts(responses, "data.response", q),
                                   np.array(ratings, dtype=np.float64), "rating", ctx)
        return Parsed("ratings", table, q.table())
    raise LabelsError(f"{ctx.path}: row 0: field 'annotations': no pairwise, rating or ranker results")


# -- trl -----------------------------------------------------------------------------------------


def _is_messages(c: pa.Array) -> bool:
    return pa.types.is_list(c.type) and pa.types.is_struct(c.type.value_type)


def _response_of(raw: pa.Table, name: str) -> tuple[pa.Array, np.ndarray]:
    """A completion column (string or assistant message list) -> text of its last message."""
    c = col(raw, name)
    if _is_messages(c):
        _, content, _, ne = last_and_rest(c, name)
        return content, ne
    return text(raw, name), np.ones(len(c), dtype=bool)


def read_trl_preference(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """TRL preference rows: standard (strings) or conversational (message lists), with an
    explicit ``prompt`` or an implicit one (the shared beginning of chosen and rejected)."""
    require(raw, ["chosen", "rejected"], ctx)
    expect(raw, {"prompt": "text|messages", "chosen": "text|messages", "rejected": "text|messages", "margin": "number"})
    q = Quarantine(raw, ctx.row_offset)
    chosen_c, rejected_c = col(raw, "chosen"), col(raw, "rejected")
    if "prompt" in raw.column_names:
        prompt = canonical_messages(col(raw, "prompt"), "prompt") if _is_messages(col(raw, "prompt")) \
            else as_prompt(text(raw, "prompt"))
        chosen, ok_c = _response_of(raw, "chosen")
        rejected, ok_r = _response_of(raw, "rejected")
        q.add(~(ok_c & ok_r), "empty chosen or rejected message list")
    elif _is_messages(chosen_c):
        prefix_c, chosen, _, ok_c = last_and_rest(chosen_c, "chosen")
        prefix_r, rejected, _, ok_r = last_and_rest(rejected_c, "rejected")
        q.add(~(ok_c & ok_r), "empty chosen or rejected message list")
        q.add(~same_messages(prefix_c, prefix_r), "implicit prompt: chosen and rejected differ before the last message")
        prompt = prefix_c
    else:  # implicit prompt in plain text: the longest shared beginning (no Arrow kernel does this)
        import os.path

        cs, rs = text(raw, "chosen").to_pylist(), text(raw, "rejected").to_pylist()
        common = [os.path.commonprefix([c or "", r or ""]) for c, r in zip(cs, rs)]
        prompt = as_prompt(pa.array(common, pa.string()))
        chosen = pa.array([c[len(p):] if c else c for c, p in zip(cs, common)], pa.string())
        rejected = pa.array([r[len(p):] if r else r for r, p in zip(rs, common)], pa.string())
        q.add(np.array([len(p.strip()) == 0 for p in common], dtype=bool), "implicit prompt: no shared beginning")
    margin = col(raw, "margin") if "margin" in raw.column_names else None
    return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx, margin=margin), q)


def _prompt_for_export(prompt: pa.Array, style: str) -> pa.Array:
    if style == "standard":
        single = pc.equal(pc.list_value_length(prompt), 1).to_numpy(zero_copy_only=False).all()
        if not single:
            raise LabelsError("trl standard style needs single-turn prompts; use --style conversational")
        return pc.struct_field(pc.list_flatten(prompt), "content")
    return prompt


def _style(table: pa.Table, options: dict) -> str:
    style = options.get("style")
    if style:
        return style
    single = pc.all(pc.equal(pc.list_value_length(col(table, "prompt")), 1)).as_py()
    return "standard" if single in (True, None) else "conversational"


def export_trl_preference(table: pa.Table, options: dict) -> pa.Table:
    """standard: prompt/chosen/rejected strings; conversational: message lists; implicit: the
    prompt is folded into chosen and rejected (conversational). ``margin`` kept when set."""
    style = _style(table, options)
    prompt = col(table, "prompt")
    if style == "standard":
        out = {"prompt": _prompt_for_export(prompt, style), "chosen": col(table, "chosen"), "rejected": col(table, "rejected")}
    elif style == "conversational":
        out = {"prompt": prompt, "chosen": one_message(col(table, "chosen")), "rejected": one_message(col(table, "rejected"))}
    elif style == "implicit":
        out = {"chosen": _concat_lists(prompt, one_message(col(table, "chosen"))),
               "rejected": _concat_lists(prompt, one_message(col(table, "rejected")))}
    else:
        raise LabelsError(f"unknown style {style!r} (standard, conversational, implicit)")
    if table.column("margin").null_count < table.num_rows:
        out["margin"] = col(table, "margin")
    return pa.table(out)


def _concat_lists(a: pa.Array, b: pa.Array) -> pa.Array:
    """Row-wise concatenation of two list columns."""
    la = pc.list_value_length(a).to_numpy(zero_copy_only=False).astype(np.int64)
    lb = pc.list_value_length(b).to_numpy(zero_copy_only=False).astype(np.int64)
    fa, fb = pc.list_flatten(a), pc.list_flatten(b)
    total = la + lb
    row = np.repeat(np.arange(len(la)), total)
    pos = np.arange(int(total.sum())) - np.repeat(np.concatenate([[0], np.cumsum(total)[:-1]]), total)
    from_a = pos < la[row]
    idx = np.where(from_a, np.concatenate([[0], np.cumsum(la)[:-1]])[row] + pos,
                   len(fa) + np.concatenate([[0], np.cumsum(lb)[:-1]])[row] + pos - la[row])
    values = pa.concat_arrays([fa, fb.cast(fa.type)]).take(pa.array(idx))
    return pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(total)]).astype(np.int32)), values, type=a.type)


def read_trl_unpaired(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """TRL unpaired preference (KTO): prompt, completion, label (bool); standard or conversational."""
    require(raw, ["prompt", "completion", "label"], ctx)
    expect(raw, {"prompt": "text|messages", "completion": "text|messages", "label": "number"})
    q = Quarantine(raw, ctx.row_offset)
    prompt = canonical_messages(col(raw, "prompt"), "prompt") if _is_messages(col(raw, "prompt")) \
        else as_prompt(text(raw, "prompt"))
    response, ok = _response_of(raw, "completion")
    label = _bool(col(raw, "label"))
    q.add(~ok, "empty completion message list")
    q.add(label < 0, "label not true/false")
    table = pa.table({"prompt_id": prompt_ids(pc.fill_null(prompt, pa.scalar([], MESSAGES))), "prompt": prompt,
                      "response": response, "label": pa.array(label == 1),
                      "_row": _rows(ctx, len(raw)), "_nrec": pa.array(np.ones(len(raw), np.int64))})
    return _finish("binary", table, q)


def export_trl_unpaired(table: pa.Table, options: dict) -> pa.Table:
    style = _style(table, options)
    if style == "standard":
        return pa.table({"prompt": _prompt_for_export(col(table, "prompt"), style),
                         "completion": col(table, "response"), "label": col(table, "label")})
    return pa.table({"prompt": col(table, "prompt"), "completion": one_message(col(table, "response")),
                     "label": col(table, "label")})


# -- openai dpo fine-tuning --------------------------------------------------------------------


def read_openai_dpo(raw: pa.Table, ctx: ReadContext) -> Parsed:
    """OpenAI preference fine-tuning JSONL: ``input.messages``, ``preferred_output``,
    ``non_preferred_output`` (each a list holding one assistant message)."""
    require(raw, ["input", "preferred_output", "non_preferred_output"], ctx)
    expect(raw, {"input": "object", "preferred_output": "messages", "non_preferred_output": "messages"})
    q = Quarantine(raw, ctx.row_offset)
    inp = col(raw, "input")
    if not pa.types.is_struct(inp.type) or "messages" not in [f.name for f in inp.type]:
        raise LabelsError(f"{ctx.path}: row 0: field 'input.messages': missing")
    messages = pa.table({"input.messages": pc.struct_field(inp, "messages")})
    expect(messages, {"input.messages": "messages"})
    prompt = canonical_messages(messages.column(0).combine_chunks(), "input.messages")
    chosen, ok_c = _response_of(raw, "preferred_output")
    rejected, ok_r = _response_of(raw, "non_preferred_output")
    q.add(~(ok_c & ok_r), "empty preferred_output or non_preferred_output")
    return _finish("pairwise", _pairwise(prompt, chosen, rejected, ctx), q)


def export_openai_dpo(table: pa.Table, options: dict) -> pa.Table:
    inp = pa.StructArray.from_arrays([col(table, "prompt")], names=["messages"])
    return pa.table({"input": inp, "preferred_output": one_message(col(table, "chosen")),
                     "non_preferred_output": one_message(col(table, "rejected"))})


# -- canonical kinds ---------------------------------------------------------------------------


def _read_canonical(kind: str):
    def read(raw: pa.Table, ctx: ReadContext) -> Parsed:
        from alignflow.schemas.kinds import schema_for

        needed = [f.name for f in schema_for(kind) if not f.nullable and f.name != "prompt_id"]
        require(raw, needed, ctx)
        table = raw.drop_columns([c for c in ("_row", "_nrec") if c in raw.column_names])
        table = table.append_column("_row", _rows(ctx, len(raw))).append_column("_nrec", pa.array(np.ones(len(raw), np.int64)))
        return Parsed(kind, table, None)

    read.__doc__ = f"A {kind} dataset of the store (or a file with its columns)."
    return read


def _export_canonical(table: pa.Table, options: dict) -> pa.Table:
    return table


# -- the registry ------------------------------------------------------------------------------

register(Format("hh-rlhf", "pairwise", "pairwise; transcripts \\n\\nHuman:/\\n\\nAssistant: (prompt turns + final answers)",
                read_hh, export_hh))
register(Format("shp", "pairwise", "pairwise; labels 1 = A; margin = log score_ratio", read_shp))
register(Format("openai-comparisons", "pairwise", "pairwise (summarize-from-feedback); margin = confidence",
                read_openai_comparisons))
register(Format("ultrafeedback", "ratings", "ratings per aspect (helpfulness, honesty, instruction_following, "
                "truthfulness; N/A kept out), overall, fine_grained -> listwise", read_ultrafeedback,
                default_aspect="helpfulness,honesty,instruction_following,truthfulness", source="ai"))
register(Format("oasst", "listwise", "listwise from sibling ranks, or by per-message signals (--aspect quality, "
                "emoji:+1, detoxify:toxicity=-1, ...); labels, emojis and detoxify kept per response; flat message "
                "rows or nested tree export",
                read_oasst, streaming=False))
register(Format("nectar", "listwise", "listwise, 7-wise ranks (rank 1 best; GPT-4 ranked)", read_nectar, source="ai"))
register(Format("helpsteer2", "ratings", "ratings (attribute file, 5 aspects) or graded pairwise (preference file, "
                "strength -3..3, ties)", read_helpsteer2, streaming=False, ties=True, default_aspect="helpfulness"))
register(Format("pku-saferlhf", "pairwise", "pairwise on --aspect helpfulness|safety; per-response safety as binary "
                "(--aspect is_safe)", read_pku))
register(Format("arena", "pairwise", "pairwise with ties (tie, tie (bothbad)); JSON conversations or one-hot CSV; "
                "--multi-turn whole keeps battles whose earlier answers differ as whole-conversation pairs (later "
                "turns inline as \\n\\nHuman:/\\n\\nAssistant:, whole_conversation = true)",
                read_arena, ties=True))
register(Format("alpaca-eval", "pairwise", "pairwise AI-judge; preference 1/2, draws 0 or 1.5, weighted floats",
                read_alpaca_eval, ties=True, source="ai"))
register(Format("graded-pairwise", "pairwise", "graded pairwise (a-is-better .. tie .. b-is-better), several annotators "
                "(aggregated, agreement reported); --aspect acceptable -> binary", read_graded, streaming=False, ties=True))
register(Format("argilla", "ratings", "rating questions (ratings) or ranking questions (listwise), several annotators",
                read_argilla, streaming=False))
register(Format("label-studio", "pairwise", "pairwise (left/right, ties on split votes), rating, ranker",
                read_label_studio, streaming=False, ties=True))
register(Format("trl-preference", "pairwise", "pairwise; standard, conversational or implicit prompt",
                read_trl_preference, export_trl_preference, source=None))
register(Format("trl-unpaired", "binary", "binary (KTO); standard or conversational", read_trl_unpaired,
                export_trl_unpaired, source=None))
register(Format("openai-dpo", "pairwise", "pairwise; OpenAI preference fine-tuning JSONL", read_openai_dpo,
                export_openai_dpo, source=None))
for _kind, _holds in (("pairwise", "canonical pairwise (chosen, rejected, margin)"),
                      ("listwise", "canonical listwise (responses, scores; ties = equal scores)"),
                      ("binary", "canonical binary (response, label)"), ("sft", "canonical sft (response)"),
                      ("prompts", "canonical prompts (prompt; optional reference = a gold answer); from any format: "
                                  "one row per prompt, reference = sft response, chosen, best or desirable response")):
    register(Format(_kind, _kind, _holds, _read_canonical(_kind), _export_canonical, ties=_kind in ("listwise", "binary"),
                    source=None))
CANONICAL = ("pairwise", "listwise", "binary", "sft", "prompts")


def _ratings_by_prompt(prompts: np.ndarray, q: Quarantine, responses: pa.Array, ratings: np.ndarray,
                       aspect: str, ctx) -> pa.Table:
    """Rows rating one response each (those ``q`` keeps; a null prompt is quarantined) grouped
    into one ratings row per prompt.

    Responses keep their input order within a prompt; ``_row`` is each group's first input row.
    """
    pd = import_pandas()

    q.add(pd.isna(prompts), "null prompt")
    keep = np.flatnonzero(~q.bad)
    codes, uniques = pd.factorize(prompts[keep])
    order = keep[np.argsort(codes, kind="stable")]
    sizes = np.bincount(codes, minlength=len(uniques))
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
    first = np.full(len(uniques), len(prompts), dtype=np.int64)
    np.minimum.at(first, codes, keep)
    prompt = as_prompt(pa.array(uniques.astype(object), pa.string()))
    return pa.table({"prompt_id": prompt_ids(prompt), "prompt": prompt,
                     "responses": pa.ListArray.from_arrays(offsets, responses.take(pa.array(order))),
                     ASPECT_PREFIX + aspect: pa.ListArray.from_arrays(offsets, pa.array(ratings[order], pa.float64())),
                     "_row": pa.array(first + ctx.row_offset), "_nrec": pa.array(sizes.astype(np.int64))})


# formats of fine-tuning frameworks and AI-feedback tools, in modules of their own (they register on import)
from alignflow.feedback.labels import distilabel_formats, trainer_formats  # noqa: F401
