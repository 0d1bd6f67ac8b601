"""Shapes of data: Arrow schemas of every kind, validation, the dataset store, interfaces."""

from alignflow.schemas.kinds import KINDS, MESSAGES, SCHEMA_VERSION, SCHEMAS, schema_for
from alignflow.schemas.prompts import messages, prompt_id, prompt_ids, to_messages_array
from alignflow.schemas.store import (
    DatasetError,
    DatasetWriter,
    iter_batches,
    read_dataset,
    read_manifest,
    verify_dataset,
    write_dataset,
)
from alignflow.schemas.validate import Validation, validate

__all__ = [
    "KINDS", "MESSAGES", "SCHEMA_VERSION", "SCHEMAS", "schema_for", "messages", "prompt_id",
    "prompt_ids", "to_messages_array", "DatasetError", "DatasetWriter", "iter_batches",
    "read_dataset", "read_manifest", "verify_dataset", "write_dataset", "Validation", "validate",
]
