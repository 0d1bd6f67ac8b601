"""``make_generator(backend, model, **kw)``: a generation backend by name, imported lazily.

* ``hf``: ``HFGenerator(model, tokenizer=None, device=None, batch_size=64, ...)``
* ``vllm``: ``VLLMGenerator(model, **engine_kwargs)`` (needs the ``vllm`` extra)
* ``openai``: ``OpenAIGenerator(model, base_url=None, api_key=None (env), max_concurrency=8, ...)``
"""

from __future__ import annotations

from typing import Any

BACKENDS = ("hf", "vllm", "openai")


def make_generator(backend: str, model: Any, **kwargs: Any):
    if backend == "hf":
        from alignflow.feedback.generation.hf import HFGenerator

        return HFGenerator(model, **kwargs)
    if backend == "vllm":
        from alignflow.feedback.generation.vllm import VLLMGenerator

        return VLLMGenerator(str(model), **kwargs)
    if backend == "openai":
        from alignflow.feedback.generation.openai import OpenAIGenerator

        return OpenAIGenerator(str(model), **kwargs)
    raise ValueError(f"unknown generation backend {backend!r}; known: {', '.join(BACKENDS)}")
