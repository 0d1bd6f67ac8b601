"""Generation backends satisfying ``schemas.generator.Generator``.

``hf`` (transformers, in process) lives in ``feedback.generation.hf``; import backends from their
modules so this package stays light. ``make_generator(backend, model, **kw)`` picks one by name.
"""

from __future__ import annotations

from typing import Any


def make_generator(backend: str, model: Any, **kwargs: Any):
    """A generator for ``backend`` ("hf"; other backends register in their own modules)."""
    if backend == "hf":
        from feedback.generation.hf import HFGenerator

        return HFGenerator(model, **kwargs)
    raise ValueError(f"unknown generation backend {backend!r}; known: hf")
