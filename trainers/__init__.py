"""Consumers of data: log-prob computation, every alignment loss, trainers."""
