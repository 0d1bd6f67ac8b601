"""Human (and AI) labels: read a dozen published formats, convert between kinds, export.

Public API::

    from alignflow.feedback.labels import convert_labels_file, Options, FORMATS, get_format
    report = convert_labels_file("hh.jsonl.gz", "out/pairs", "hh-rlhf", "pairwise",
                                 Options(ties="drop"), quarantine_path="out/quarantine")
    print(report.line())   # read N = written + quarantined + dropped-by-rule

Kind conversions (``feedback.labels.conversions``): ``listwise_to_pairwise``,
``pairwise_to_listwise`` (Bradley-Terry, Copeland check, cycles), ``pairwise_to_binary``,
``listwise_to_binary``, ``ratings_to_listwise``, ``to_sft``, ``to_prompts``. Annotator aggregation and
agreement: ``feedback.labels.aggregate``.
"""

from alignflow.feedback.labels.conversions import (
                                         STRATEGIES,
                                         bradley_terry,
                                         listwise_to_binary,
                                         listwise_to_pairwise,
                                         pairwise_to_binary,
                                         pairwise_to_listwise,
                                         ratings_to_listwise,
                                         to_prompts,
                                         to_sft,
)
from alignflow.feedback.labels.convert import Options, Report, convert_kind, convert_labels_file
from alignflow.feedback.labels.errors import LabelsError
from alignflow.feedback.labels.formats import CANONICAL, FORMATS, Format, Parsed, ReadContext, get_format
from alignflow.feedback.labels.io import FileWriter, iter_file_batches, read_file, write_file

__all__ = [
    "CANONICAL", "FORMATS", "STRATEGIES", "FileWriter", "Format", "LabelsError", "Options", "Parsed", "ReadContext",
    "Report", "bradley_terry", "convert_kind", "convert_labels_file", "get_format", "iter_file_batches",
    "listwise_to_binary", "listwise_to_pairwise", "pairwise_to_binary", "pairwise_to_listwise", "ratings_to_listwise",
    "read_file", "to_prompts", "to_sft", "write_file",
]
