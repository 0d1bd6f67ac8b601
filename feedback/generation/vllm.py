"""In-process vLLM engine backend (the ``vllm`` extra; GPU). Written against vLLM 0.33's API.

Request building and output parsing are pure functions of plain values and vLLM-shaped objects
(``RequestOutput.outputs[i].text / token_ids / cumulative_logprob / logprobs``,
``RequestOutput.prompt_logprobs``); ``tests/fake_vllm`` checks every call against the real API.
``import vllm`` happens only when a ``VLLMGenerator`` is built.

Parity with the ``hf`` backend (same checkpoint, same numbers):

* prompts are token ids from the same ``chat_prompt_ids`` as ``hf``, sent as ``TokensPrompt``;
* the engine runs with ``logprobs_mode="raw_logprobs"`` (vLLM's default, set explicitly): log-probs
  are ``log_softmax`` of the raw logits, before temperature and top-k/p, which is ``hf``'s
  definition of ``Generation.logp``;
* ``generate`` asks ``SamplingParams(logprobs=0)``: the sampled token's log-prob at each step. vLLM
  keeps the stop token (eos) in ``token_ids`` and out of the text, so ``logp`` includes eos, as
  ``hf``'s does;
* ``score_batch(prompts, continuations, add_eos=...)`` sends the prompt ids plus the continuation
  tokenized on its own (plus ``eos_token_id`` with ``add_eos=True``) with ``max_tokens=1,
  prompt_logprobs=0``; vLLM reports every prompt token's log-prob and the continuation's are summed.

Lifecycle (``VLLMGenerator``):

* one engine per process: building one shuts the process's previous engine down first (two
  engines would split one GPU, and sleep mode's CuMem allocator serves one engine per process);
* ``release()`` gives the GPU memory back before training needs it: with sleep mode
  (``enable_sleep_mode=True``, the default here) ``LLM.sleep(level=2)`` drops weights and KV
  cache; without it the engine is shut down;
* ``load_weights(path)`` puts a checkpoint folder of the same architecture into the running
  engine (``collective_rpc("reload_weights", kwargs={"weights_path": path})``, vLLM's in-place
  reload); a sleeping engine is woken in the order vLLM documents for RLHF weight updates:
  ``wake_up(tags=["weights"])``, reload, ``wake_up(tags=["kv_cache"])``. A released engine
  reloads its last weights the same way on its next call.
* engine options (``gpu_memory_utilization``, ``tensor_parallel_size``, ``max_model_len``,
  ``dtype``, ``enable_prefix_caching``, ... any ``vllm.LLM`` / ``EngineArgs`` keyword) pass
  through; an unknown one fails in one line naming it.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any, Sequence

from alignflow.schemas.generator import Generation, Messages, SamplingParams

# Defaults this backend sets (a caller's engine options win): parity and release need them.
ENGINE_DEFAULTS = {"enable_sleep_mode": True, "logprobs_mode": "raw_logprobs", "trust_remote_code": False}


def sampling_kwargs(n: int, sampling: SamplingParams, *, logprobs: int | None = 0,
                    prompt_logprobs: int | None = None) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for ``n`` samples (pure).

    ``top_k=0`` disables top-k in both (vLLM also accepts -1); ``temperature=0`` is greedy in both.
    """
    kw: dict[str, Any] = {
        "n": n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": max(0, sampling.top_k),
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


# Keys that differ between saved copies of one model (names, versions, where it was loaded from).
_VOLATILE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "is_local",
             "local_files_only", "_commit_hash"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _settings(path: Path) -> dict | str | None:
    """A config or tokenizer file's content minus volatile keys (raw text when not JSON; None if absent)."""
    if not path.exists():
        return None
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        return text
    return {k: v for k, v in data.items() if k not in _VOLATILE} if isinstance(data, dict) else data


def same_architecture(a: str | Path, b: str | Path) -> bool:
    """Whether checkpoint folder ``b`` can be loaded into an engine built for ``a``: the same model
    config and tokenizer (but for names and versions)."""
    a, b = Path(a), Path(b)
    if _settings(a / "config.json") is None or _settings(b / "config.json") is None:
        return False
    return all(_settings(a / name) == _settings(b / name) for name in ("config.json", *_TOKENIZER_FILES))


_ACTIVE: list = [None]  # the process's one live engine (a VLLMGenerator)


def active_engine() -> "VLLMGenerator | None":
    return _ACTIVE[0]


def shutdown_engine() -> None:
    """Shut the process's engine down (frees its GPU memory); a no-op when none is live."""
    if _ACTIVE[0] is not None:
        _ACTIVE[0].close()


class VLLMGenerator:
    """``schemas.generator.Generator`` over ``vllm.LLM`` (in-process engine; see the module doc)."""

    name = "vllm"

    def __init__(self, model: str, *, tokenizer: str | None = None, seed: int = 0, **engine_options: Any):
        try:
            import vllm  # the optional extra
        except ImportError as exc:
            raise ImportError("the vllm backend needs vLLM: pip install 'alignflow[vllm]' (GPU)") from exc
        self._vllm = vllm
        shutdown_engine()  # one engine per process
        self.options = {**ENGINE_DEFAULTS, **engine_options}
        try:
            self.llm = vllm.LLM(model=str(model), tokenizer=tokenizer, seed=seed, **self.options)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
            raise ValueError(f"vllm engine option not accepted by vllm.LLM: {exc}") from None
        self.model_name = str(model)
        self.weights = str(model)  # checkpoint folder whose weights the engine holds
        self.tokenizer = self.llm.get_tokenizer()
        self.sleeping = False
        self.closed = False
        self.weight_loads = 0  # reloads done (load_weights, and wake-ups after a level-2 sleep)
        self.weight_load_s = 0.0
        _ACTIVE[0] = self

    def provenance(self) -> dict:
        return {"backend": self.name, "model": self.model_name,
                "engine": {k: v for k, v in self.options.items() if isinstance(v, (str, int, float, bool))}}

    @property
    def context_length(self) -> int | None:
        """The engine's ``max_model_len`` (prompt and generation, in tokens)."""
        try:
            return int(self.llm.llm_engine.model_config.max_model_len)
        except (AttributeError, TypeError, ValueError):
            return None

    # -- lifecycle --------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the vLLM engine of {self.model_name} was shut down (one engine per process: "
                               "another engine took its place); build a new VLLMGenerator")

    def _reload(self, path: str) -> None:
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
        self.weight_load_s += time.perf_counter() - start
        self.weight_loads += 1
        self.weights = str(path)

    def _wake(self, path: str) -> None:
        """Wake a sleeping engine with ``path``'s weights, allocating no KV cache until they are in."""
        _empty_device_cache()  # memory training freed but torch's allocator still holds
        self.llm.wake_up(tags=["weights"])
        self._reload(path)
        self.llm.wake_up(tags=["kv_cache"])
        self.sleeping = False

    def _ensure_awake(self) -> None:
        self._check_open()
        if self.sleeping:
            self._wake(self.weights)

    def load_weights(self, path: str | Path) -> None:
        """Put the weights of checkpoint folder ``path`` (same architecture) into the engine."""
        self._check_open()
        if self.sleeping:
            self._wake(str(path))
        else:
            self._reload(str(path))
        self.model_name = str(path)

    def can_load(self, path: str | Path) -> bool:
        """Whether ``path`` fits this engine (same architecture and tokenizer as the current weights)."""
        return not self.closed and same_architecture(self.weights, path)

    def release(self) -> None:
        """Give the GPU memory back (sleep level 2, or shut down without sleep mode)."""
        if self.closed or self.sleeping:
            return
        if self.options.get("enable_sleep_mode"):
            self.llm.sleep(level=2)
            self.sleeping = True
        else:
            self.close()

    def close(self) -> None:
        """Shut the engine down and free its memory (the generator is unusable afterwards)."""
        if self.closed:
            return
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del self.llm
        self.closed = True
        if _ACTIVE[0] is self:
            _ACTIVE[0] = None
        gc.collect()
        _empty_device_cache()

    # -- generation and scoring -------------------------------------------------------------
    def _prompt_ids(self, messages: Messages) -> list[int]:
        from alignflow.feedback.generation.hf import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, messages)

    def generate(self, prompts: Sequence[Messages], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Generation]]:
        self._ensure_awake()
        params = self._vllm.SamplingParams(**sampling_kwargs(n, sampling or SamplingParams()))
        requests = [self._vllm.TokensPrompt(prompt_token_ids=self._prompt_ids(m)) for m in prompts]
        return parse_request_outputs(self.llm.generate(requests, params, use_tqdm=False))

    def score(self, prompt: Messages, continuations: Sequence[str]) -> list[float]:
        """Summed log-probs of each continuation after the prompt (no eos added), as ``hf``."""
        return self.score_batch([prompt] * len(continuations), list(continuations))

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[str], add_eos: bool = False,
                    return_tokens: bool = False):
        """Flat pairs (``prompts[k]``, ``continuations[k]``), with ``hf``'s signature and meaning:
        ``add_eos=True`` scores the end-of-sequence token after the continuation as well."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        self._ensure_awake()
        params = self._vllm.SamplingParams(**score_kwargs())
        requests, starts, counts = [], [], []
        cache: dict[str, list[int]] = {}
        for messages, cont in zip(prompts, continuations):
            key = repr(messages)
            if key not in cache:
                cache[key] = self._prompt_ids(messages)
            prompt_ids = cache[key]
            cont_ids = list(self.tokenizer(cont, add_special_tokens=False)["input_ids"])
            if add_eos:
                cont_ids.append(self.tokenizer.eos_token_id)
            requests.append(self._vllm.TokensPrompt(prompt_token_ids=prompt_ids + cont_ids))
            starts.append(len(prompt_ids))
            counts.append(len(cont_ids))
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        scores = [continuation_logp(out.prompt_logprobs, req["prompt_token_ids"], start)
                  for out, req, start in zip(outputs, requests, starts)]
        return (scores, counts) if return_tokens else scores


def _empty_device_cache() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
