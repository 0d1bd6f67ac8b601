"""Generation backends satisfying ``schemas.generator.Generator``: ``hf``, ``vllm``, ``openai``.

Backends live in their own modules and are imported lazily, so this package stays light;
``make_generator(backend, model, **kw)`` picks one by name (see ``registry``).
"""

from alignflow.feedback.generation.registry import BACKENDS, make_generator

__all__ = ["BACKENDS", "make_generator"]
