"""Producers of data: generation backends, judges, critique-revision, rejection sampling, human-label formats."""
