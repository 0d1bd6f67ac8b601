"""In-process vLLM engine backend (the ``vllm`` extra; GPU).

Thin on purpose: request building and output parsing are pure functions of plain values and
vLLM-shaped objects (``RequestOutput.outputs[i].text / token_ids / cumulative_logprob /
logprobs``, ``RequestOutput.prompt_logprobs``), tested with fake objects where vLLM is not
installed. ``import vllm`` happens only when a ``VLLMGenerator`` is built.

* ``generate``: one ``SamplingParams(n=..., logprobs=0)`` per call; vLLM returns the sampled
  token's log-prob at every step (``logprobs=0`` = no extra top-k alternatives), whose sum is
  ``Generation.logp``.
* ``score``: the prompt's chat template plus each continuation as token ids, run with
  ``max_tokens=1, prompt_logprobs=0``; vLLM then reports the log-prob of every prompt token,
  and the continuation's are summed.
"""

from __future__ import annotations

from typing import Any, Sequence

from alignflow.schemas.generator import Generation, Messages, SamplingParams


def sampling_kwargs(n: int, sampling: SamplingParams, *, logprobs: int | None = 0,
                    prompt_logprobs: int | None = None) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for ``n`` samples (pure).

    ``top_k=0`` (ours: disabled) maps to vLLM's ``-1``; ``temperature=0`` is greedy in both.
    """
    kw: dict[str, Any] = {
        "n": n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "max_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
    }
    if sampling.stop:
        kw["stop"] = list(sampling.stop)
    if logprobs is not None:
        kw["logprobs"] = logprobs
    if prompt_logprobs is not None:
        kw["prompt_logprobs"] = prompt_logprobs
    return kw


def score_kwargs() -> dict:
    """``SamplingParams`` of a scoring request: one dummy new token, every prompt token's log-prob."""
    return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}


def _logprob_value(entry: Any) -> float:
    """vLLM stores ``Logprob(logprob=..., rank=..., decoded_token=...)``; accept bare floats too."""
    return float(getattr(entry, "logprob", entry))


def sampled_token_logps(completion: Any) -> list[float] | None:
    """Per-step log-prob of each sampled token of one ``CompletionOutput`` (None if absent)."""
    steps = getattr(completion, "logprobs", None)
    if not steps:
        return None
    ids = list(completion.token_ids)
    return [_logprob_value(step[tok]) for step, tok in zip(steps, ids)]


def parse_request_outputs(outputs: Sequence[Any]) -> list[list[Generation]]:
    """``list[list[Generation]]`` (prompt-major, in request order) from vLLM ``RequestOutput``s."""
    result = []
    for req in outputs:
        gens = []
        for comp in sorted(req.outputs, key=lambda c: getattr(c, "index", 0)):
            token_logps = sampled_token_logps(comp)
            if token_logps is not None:
                logp = float(sum(token_logps))
            else:
                cum = getattr(comp, "cumulative_logprob", None)
                logp = None if cum is None else float(cum)
            gens.append(Generation(comp.text, len(comp.token_ids), logp, token_logps))
        result.append(gens)
    return result


def continuation_logp(prompt_logprobs: Sequence[Any], token_ids: Sequence[int], start: int) -> float:
    """Sum of ``log p(token_ids[t] | token_ids[:t])`` for ``t >= start`` from vLLM's
    ``prompt_logprobs`` (a list aligned with ``token_ids``; entry 0 is None, each other entry a
    ``{token_id: Logprob}`` dict that always holds the actual token)."""
    if start < 1:
        raise ValueError("a continuation needs at least one prompt token before it")
    return float(sum(_logprob_value(prompt_logprobs[t][token_ids[t]]) for t in range(start, len(token_ids))))


def build_score_requests(prompt_ids: Sequence[int], continuation_ids: Sequence[Sequence[int]]) -> list[dict]:
    """One ``{"prompt_token_ids": ...}`` request per continuation (vLLM ``TokensPrompt`` shape)."""
    return [{"prompt_token_ids": list(prompt_ids) + list(c)} for c in continuation_ids]


class VLLMGenerator:
    """``schemas.generator.Generator`` over ``vllm.LLM`` (in-process engine)."""

    name = "vllm"

    def __init__(self, model: str, *, tokenizer: str | None = None, seed: int = 0, **engine_kwargs):
        try:
            import vllm  # noqa: F401  (the optional extra)
        except ImportError as exc:
            raise ImportError("the vllm backend needs vLLM: pip install 'alignflow[vllm]' (GPU)") from exc
        self._vllm = vllm
        self.model_name = model
        engine_kwargs.setdefault("trust_remote_code", False)
        self.llm = vllm.LLM(model=model, tokenizer=tokenizer, seed=seed, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def provenance(self) -> dict:
        return {"backend": self.name, "model": self.model_name}

    @property
    def context_length(self) -> int | None:
        """The engine's ``max_model_len`` (prompt and generation, in tokens)."""
        try:
            return int(self.llm.llm_engine.model_config.max_model_len)
        except (AttributeError, TypeError, ValueError):
            return None

    def _prompt_ids(self, messages: Messages) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def generate(self, prompts: Sequence[Messages], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Generation]]:
        params = self._vllm.SamplingParams(**sampling_kwargs(n, sampling or SamplingParams()))
        requests = [{"prompt_token_ids": self._prompt_ids(m)} for m in prompts]
        return parse_request_outputs(self.llm.generate(requests, params, use_tqdm=False))

    def score(self, prompt: Messages, continuations: Sequence[str]) -> list[float]:
        return self.score_batch([prompt] * len(continuations), list(continuations))

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[str]) -> list[float]:
        """Flat pairs (``prompts[k]``, ``continuations[k]``), as the ``hf`` backend."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        params = self._vllm.SamplingParams(**score_kwargs())
        requests, starts = [], []
        for messages, cont in zip(prompts, continuations):
            prompt_ids = self._prompt_ids(messages)
            cont_ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            requests.extend(build_score_requests(prompt_ids, [cont_ids]))
            starts.append(len(prompt_ids))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [continuation_logp(out.prompt_logprobs, req["prompt_token_ids"], start)
                for out, req, start in zip(outputs, requests, starts)]
