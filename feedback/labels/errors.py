"""The one error type of the labels package: a one-line message naming file, row and field."""

from __future__ import annotations


class LabelsError(ValueError):
    """Bad input (unknown format, unreadable file, wrong columns): ``FILE: row N: field F: ...``.

    A ``ValueError`` so that the CLI's ``user_errors`` turns it into one line and exit code 2.
    """


def missing_columns(path, fmt: str, missing: list[str], present: list[str]) -> LabelsError:
    return LabelsError(
        f"{path}: row 0: field {missing[0]!r}: missing; format {fmt} needs "
        f"{', '.join(missing)} (file has: {', '.join(present) or 'no columns'})"
    )


class FieldTypeError(LabelsError):
    """A value of the wrong type in a field (an object or a list where text is expected).

    Raised by the column helpers, which know the batch row but not the file; the pipeline
    (``formats.read_batch``) re-raises it as ``FILE: row N: field F: ...``.
    """

    def __init__(self, field: str, row: int, what: str):
        super().__init__(f"row {row}: field {field!r}: {what}")
        self.field, self.row, self.what = field, row, what
