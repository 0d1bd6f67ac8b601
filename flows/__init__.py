"""Prefect flows and tasks composing schemas, feedback and trainers; the alignflow CLI."""
