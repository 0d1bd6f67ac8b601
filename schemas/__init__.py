"""Shapes of data: Arrow schemas of every kind, validation, the dataset store, interfaces."""

from schemas.kinds import KINDS, MESSAGES, SCHEMA_VERSION, SCHEMAS, schema_for
from schemas.prompts import messages, prompt_id, prompt_ids, to_messages_array
from schemas.store import (
    DatasetError,
    DatasetWriter,
    iter_batches,
    read_dataset,
    read_manifest,
    verify_dataset,
    write_dataset,
)
from schemas.validate import Validation, validate

__all__ = [
    "KINDS", "MESSAGES", "SCHEMA_VERSION", "SCHEMAS", "schema_for", "messages", "prompt_id",
    "prompt_ids", "to_messages_array", "DatasetError", "DatasetWriter", "iter_batches",
    "read_dataset", "read_manifest", "verify_dataset", "write_dataset", "Validation", "validate",
]
