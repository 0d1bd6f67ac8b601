"""Arrow schemas of every data kind (DESIGN.md, "Data kinds").

Every row has ``prompt_id`` (stable hash of the prompt unless given) and ``prompt``
(a list of ``{role, content}`` messages; a plain string becomes one user turn).
Optional columns added by later stages (``ref_*`` log-probs, token counts, judge outputs)
keep the canonical names and types listed in ``OPTIONAL_COLUMNS``.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
ROLES = ("system", "user", "assistant", "tool")

_BASE = [pa.field("prompt_id", pa.string(), nullable=False), pa.field("prompt", MESSAGES, nullable=False)]


def _schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema(_BASE + list(fields))


ROUND = pa.struct([("principle", pa.string()), ("critique", pa.string()), ("revision", pa.string())])

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": _schema(),
    "samples": _schema(
        pa.field("response", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("logp", pa.float64()),
        pa.field("n_tokens", pa.int64()),
    ),
    "pairwise": _schema(
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("margin", pa.float64()),
        pa.field("source", pa.string()),
    ),
    "listwise": _schema(
        pa.field("responses", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float64()), nullable=False),
    ),
    "binary": _schema(
        pa.field("response", pa.string(), nullable=False),
        pa.field("label", pa.bool_(), nullable=False),
    ),
    "sft": _schema(pa.field("response", pa.string(), nullable=False)),
    "critiques": _schema(
        pa.field("response", pa.string(), nullable=False),
        pa.field("rounds", pa.list_(ROUND)),
    ),
}
KINDS = tuple(SCHEMAS)

# Columns that a field of the schema may lack in a row (nullable in the schema).
NULLABLE = {k: {f.name for f in s if f.nullable} for k, s in SCHEMAS.items()}

# Canonical optional columns added by later stages; kept with these types when present.
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "ref_chosen_logps": pa.float64(),
    "ref_rejected_logps": pa.float64(),
    "chosen_tokens": pa.int64(),
    "rejected_tokens": pa.int64(),
    "tokens": pa.int64(),
    "judge_prob": pa.float64(),
    "judge_consistent": pa.bool_(),
    "chosen_winrate": pa.float64(),
    "rejected_winrate": pa.float64(),
    "reward": pa.float64(),
    "annotators": pa.int64(),
    "agreement": pa.float64(),
    "reference": pa.string(),  # prompts: a gold answer (DNO's gold, PPO's pretraining text)
}
# ref_logps / tokens are per-response lists in listwise data, scalars elsewhere.
LIST_OPTIONAL = {"ref_logps": pa.list_(pa.float64()), "tokens": pa.list_(pa.int64())}
SCALAR_OPTIONAL = {"ref_logps": pa.float64()}


def optional_type(kind: str, name: str) -> pa.DataType | None:
    """Canonical type of optional column ``name`` in ``kind``, or None if it has none."""
    if kind == "listwise" and name in LIST_OPTIONAL:
        return LIST_OPTIONAL[name]
    if name in SCALAR_OPTIONAL:
        return SCALAR_OPTIONAL[name]
    return OPTIONAL_COLUMNS.get(name)


def schema_for(kind: str) -> pa.Schema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}") from None
