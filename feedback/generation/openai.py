"""Generation backend for any OpenAI-compatible server (vLLM serve, SGLang, TGI, llama.cpp,
``transformers serve``).

* Concurrency: a thread pool of ``max_concurrency`` workers shares one ``httpx.Client``
  (thread-safe, keeps connections alive), so at most that many requests are in flight.
* Retries: 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times
  with exponential backoff ``backoff * 2**attempt`` (capped at ``max_backoff``, plus up to 10 %
  jitter); a ``Retry-After`` header, when the server sends one, is honoured instead.
  Other 4xx answers fail at once with the server's message.
* Log-probs: requested on every call; used when the server returns them (vLLM, llama.cpp,
  OpenAI), and the backend works without them (``transformers serve`` ignores the field):
  ``Generation.logp`` is then ``None`` and ``score`` raises ``LogprobsUnavailable`` (a
  ``NotImplementedError``), which judges take as the signal to generate-and-parse instead.
* Online training (a vLLM server with ``VLLM_SERVER_DEV_MODE=1``): ``reload_weights(path)`` has
  the server load a saved checkpoint in place through its ``/collective_rpc`` endpoint.
* Scoring (``score``/``score_batch``), two routes:
  - with ``tokenizer=`` (the served model's tokenizer, or its name/path; only its chat template
    is used): the legacy ``/completions`` endpoint with ``echo=True, logprobs=1,
    max_tokens=1`` (vLLM serve supports it; vLLM rejects ``max_tokens=0``) returns the log-prob
    of every prompt token; a continuation of ANY length is scored as the sum over the tokens of
    the chat-templated "prompt + continuation" that end after the prompt text (``text_offset``);
  - without: ``/chat/completions`` with ``top_logprobs``: single-token continuations only (a
    judge's "1"/"2"), read at the first answer position; a longer continuation that is not in
    that table raises ``LogprobsUnavailable`` naming the fix (pass ``tokenizer=``).
* Secrets: the API key comes from the argument or the environment (``ALIGNFLOW_API_KEY``, then
  ``OPENAI_API_KEY``); it is sent only in the ``Authorization`` header and never appears in
  ``repr``, error messages or ``provenance()``.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import httpx

from alignflow.schemas.generator import Generation, Messages, SamplingParams

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class LogprobsUnavailable(NotImplementedError):
    """The server does not return log-probs, so ``score`` cannot be answered."""


class OpenAIError(RuntimeError):
    """A request failed for good (non-retryable status, or retries exhausted)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status of a non-retryable answer, else None


def api_key_from_env() -> str | None:
    return os.environ.get("ALIGNFLOW_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: str | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): Retry-After if given, else
    ``min(cap, base * 2**attempt)`` plus up to 10 % jitter (so clients do not retry in lockstep)."""
    if retry_after:
        try:
            return min(cap, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP date: fall back to exponential backoff
    delay = min(cap, base * (2 ** attempt))
    return delay * (1.0 + 0.1 * (rng or random).random())


def chat_payload(model: str, messages: Messages, n: int, sampling: SamplingParams, *,
                 logprobs: bool = True, top_logprobs: int = 0, seed: int | None = None) -> dict:
    """Body of one ``/chat/completions`` request (pure; tested without a server)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "n": n,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.top_k:
        body["top_k"] = sampling.top_k  # an extension most open servers accept
    if seed is not None:
        body["seed"] = seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if logprobs:
        body["logprobs"] = True
        if top_logprobs:
            body["top_logprobs"] = top_logprobs
    return body


def _choice_token_logprobs(choice: dict) -> list[dict] | None:
    content = (choice.get("logprobs") or {}).get("content")
    return content if content else None


def parse_chat_choices(data: dict) -> list[Generation]:
    """``Generation`` objects from one chat-completions answer.

    ``logp`` is the sum of the returned token log-probs (None when the server sent none);
    ``n_tokens`` counts those tokens, else comes from ``usage.completion_tokens`` (split evenly
    when several choices share one usage record; an estimate only in that case).
    """
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    usage = (data.get("usage") or {}).get("completion_tokens")
    out = []
    for choice in choices:
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        tokens = _choice_token_logprobs(choice)
        if tokens is not None:
            token_logps = [float(t["logprob"]) for t in tokens]
            out.append(Generation(text, len(token_logps), float(sum(token_logps)), token_logps))
        else:
            n_tok = int(round(usage / len(choices))) if usage is not None else 0
            out.append(Generation(text, n_tok, None))
    return out


def first_token_top_logprobs(data: dict) -> dict[str, float] | None:
    """``{token text: log-prob}`` of the first generated position, or None if not returned."""
    choices = data.get("choices") or []
    if not choices:
        return None
    tokens = _choice_token_logprobs(choices[0])
    if not tokens:
        return None
    first = tokens[0]
    table = {t["token"]: float(t["logprob"]) for t in first.get("top_logprobs") or []}
    table.setdefault(first["token"], float(first["logprob"]))
    return table


def lookup_continuations(top: dict[str, float], continuations: Sequence[str]) -> list[float]:
    """Log-probs of single-token continuations read off the first position's top log-probs.

    A continuation is matched exactly, else ignoring surrounding whitespace (servers differ in
    how they print a leading space). One absent from the top-K gets ``-inf``: its probability is
    below every listed one, and judges normalise over the candidates.
    """
    stripped: dict[str, float] = {}
    for tok, lp in top.items():
        key = tok.strip()
        stripped[key] = max(lp, stripped.get(key, -math.inf))
    return [top.get(c, stripped.get(c.strip(), -math.inf)) for c in continuations]


def echo_payload(model: str, texts: Sequence[str]) -> dict:
    """Body of one legacy ``/completions`` request that echoes ``texts`` (rendered prompt +
    continuation, one per entry) with each token's log-prob. ``max_tokens=1``: vLLM rejects 0;
    the one generated token lies after the echoed text and is left out by offset.
    ``add_special_tokens=False``: the chat template already wrote the special tokens (BOS);
    vLLM's ``/completions`` would add a second BOS by default (its chat route does not)."""
    return {"model": model, "prompt": list(texts), "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0.0, "add_special_tokens": False}


def echoed_span_logprob(choice: dict, start: int, stop: int) -> float | None:
    """Sum of the echoed token log-probs over the text [start, stop) of one ``/completions``
    choice (``logprobs.text_offset`` / ``token_logprobs``): the tokens that end after ``start``
    and begin before ``stop``, so a token a merge stretches across the prompt/continuation
    boundary counts for the continuation. None when the server returned no such log-probs."""
    lp = choice.get("logprobs") or {}
    offsets, values = lp.get("text_offset"), lp.get("token_logprobs")
    if not offsets or not values or len(offsets) != len(values):
        return None
    text = choice.get("text")
    ends = list(offsets[1:]) + [max(len(text) if isinstance(text, str) else stop, stop)]
    span = [v for off, end, v in zip(offsets, ends, values) if end > start and off < stop]
    if not span or any(v is None for v in span):
        return None
    return float(sum(float(v) for v in span))


class OpenAIGenerator:
    """``schemas.generator.Generator`` over HTTP for an OpenAI-compatible server.

    >>> gen = OpenAIGenerator("toy", base_url="http://127.0.0.1:8000/v1")
    >>> gen.generate([[{"role": "user", "content": "hi"}]], n=2)
    """

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, *,
                 max_concurrency: int = 8, max_retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 30.0, timeout: float = 120.0, top_logprobs: int = 20,
                 request_logprobs: bool = True, tokenizer: Any = None, context_length: int | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self.base_url = (base_url or os.environ.get("ALIGNFLOW_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or DEFAULT_BASE_URL).rstrip("/")
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.top_logprobs = top_logprobs
        self.request_logprobs = request_logprobs
        self.logprobs_supported: bool | None = None  # learnt from the first answer
        self._tokenizer = tokenizer  # object or name/path (loaded on first use); its chat template renders prompts
        self._context_option = context_length  # the user's --context-length
        self._context: int | None | bool = False  # False: not looked up yet
        self._sleep = sleep
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self.retries_done = 0  # how many retries this client needed (for logs and tests)
        key = api_key or api_key_from_env()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                    transport=transport,
                                    limits=httpx.Limits(max_connections=self.max_concurrency))

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIGenerator(model={self.model!r}, base_url={self.base_url!r})"

    def provenance(self) -> dict:
        prov = {"backend": self.name, "model": self.model, "base_url": self.base_url}
        if self._tokenizer is not None:  # log-prob scores then come from /completions echo with its template
            tok = self._tokenizer
            named = isinstance(tok, (str, os.PathLike))
            prov["tokenizer"] = str(tok) if named else getattr(tok, "name_or_path", type(tok).__name__)
        return prov

    @property
    def context_length(self) -> int | None:
        """The served model's context in tokens: ``max_model_len`` from ``/models`` where the
        server reports it (vLLM does), else ``context_length=``, else the tokenizer's
        ``model_max_length`` (with ``tokenizer=``), else None (unknown). Looked up once."""
        if self._context is False:
            self._context = self._served_context() or self._context_option
            if self._context is None and self._tokenizer is not None:
                from alignflow.feedback.context import tokenizer_context

                self._context = tokenizer_context(self.tokenizer)
        return self._context

    def _served_context(self) -> int | None:
        try:
            resp = self._client.get("/models", timeout=10)
            entries = resp.json().get("data") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        entries = [e for e in entries or [] if isinstance(e, dict)]
        mine = [e for e in entries if e.get("id") == self.model] or (entries if len(entries) == 1 else [])
        value = mine[0].get("max_model_len") if mine else None
        return value if isinstance(value, int) and value > 0 else None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "OpenAIGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport with retries -------------------------------------------------------------
    def post(self, path: str, body: dict) -> dict:
        """POST ``body`` as JSON, retrying 429/5xx/timeouts with exponential backoff."""
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self._client.post(path, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return resp.json()
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    raise OpenAIError(f"{self.base_url}{path}: {last}", status=resp.status_code)
                retry_after = resp.headers.get("retry-after")
            if attempt == self.max_retries:
                break
            with self._lock:
                self.retries_done += 1
                delay = backoff_delay(attempt, self.backoff, self.max_backoff, retry_after, self._rng)
            self._sleep(delay)
        raise OpenAIError(f"{self.base_url}{path}: gave up after {self.max_retries + 1} attempts ({last})")

    def _map(self, fn: Callable, items: Sequence, progress: Callable[[int], None] | None = None) -> list:
        if len(items) <= 1 or self.max_concurrency == 1:
            out = []
            for item in items:
                out.append(fn(item))
                if progress:
                    progress(1)
            return out
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            futures = [pool.submit(fn, item) for item in items]
            out = []
            for f in futures:
                out.append(f.result())
                if progress:
                    progress(1)
            return out

    # -- Generator interface ----------------------------------------------------------------
    def generate(self, prompts: Sequence[Messages], n: int = 1, sampling: SamplingParams | None = None,
                 progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """``n`` responses per prompt; servers that return fewer choices than asked (some ignore
        ``n``) are asked again until ``n`` are in hand, each request with its own seed."""
        sampling = sampling or SamplingParams()

        def one(indexed: tuple[int, Messages]) -> list[Generation]:
            i, messages = indexed
            got: list[Generation] = []
            call = 0
            while len(got) < n:
                seed = None if sampling.seed is None else sampling.seed + 1_000_003 * i + call
                data = self.post("/chat/completions", chat_payload(
                    self.model, messages, n - len(got), sampling,
                    logprobs=self.request_logprobs and self.logprobs_supported is not False, seed=seed))
                gens = parse_chat_choices(data)
                if not gens:
                    raise OpenAIError(f"{self.base_url}/chat/completions: answer without choices")
                if self.request_logprobs and self.logprobs_supported is None:
                    self.logprobs_supported = gens[0].logp is not None
                got.extend(gens)
                call += 1
            return got[:n]

        return self._map(one, list(enumerate(prompts)), progress)

    def score(self, prompt: Messages, continuations: Sequence[str]) -> list[float]:
        """Summed log-probs of each continuation after the prompt (see the module doc for the
        two routes). Raises ``LogprobsUnavailable`` when the server cannot give them."""
        return self.score_batch([prompt] * len(continuations), list(continuations))

    def score_batch(self, prompts: Sequence[Messages], continuations: Sequence[str],
                    progress: Callable[[int], None] | None = None, add_eos: bool = False) -> list[float]:
        """Flat pairs (``prompts[k]``, ``continuations[k]``), as the ``hf`` backend; one request
        per distinct prompt answers all of its continuations. ``add_eos=True`` scores the
        end-of-sequence token after each continuation too (as ``hf``): the tokenizer's eos text is
        appended and its echoed log-prob summed, so it needs ``tokenizer=``."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if add_eos:
            if self._tokenizer is None:
                raise LogprobsUnavailable("scoring with add_eos=True needs tokenizer=<the served model's tokenizer> "
                                          "(--tokenizer): the eos token is scored through /completions echo")
            continuations = [c + self.tokenizer.eos_token for c in continuations]
        if self.logprobs_supported is False and self._tokenizer is None:
            raise LogprobsUnavailable(f"{self.base_url} returns no log-probs")
        groups: dict[str, list[int]] = {}
        for k, p in enumerate(prompts):
            groups.setdefault(repr(p), []).append(k)
        keys = list(groups)
        if self._tokenizer is not None:
            _ = self.tokenizer  # load a named tokenizer once here, not in each worker thread at once
        one = self._score_by_echo if self._tokenizer is not None else self._score_by_top_logprobs
        out = [0.0] * len(prompts)
        for key, values in zip(keys, self._map(lambda key: one(prompts[groups[key][0]],
                                                               [continuations[k] for k in groups[key]]),
                                               keys, progress)):
            for k, v in zip(groups[key], values):
                out[k] = v
        return out

    def _score_by_top_logprobs(self, prompt: Messages, continuations: list[str]) -> list[float]:
        """Single-token continuations from the first answer position's ``top_logprobs``."""
        greedy = SamplingParams(temperature=0.0, max_new_tokens=1)
        data = self.post("/chat/completions", chat_payload(self.model, prompt, 1, greedy, logprobs=True,
                                                           top_logprobs=self.top_logprobs))
        top = first_token_top_logprobs(data)
        if top is None:
            self.logprobs_supported = False
            raise LogprobsUnavailable(f"{self.base_url} returned no log-probs (the server ignores 'logprobs')")
        self.logprobs_supported = True
        values = lookup_continuations(top, continuations)
        for c, v in zip(continuations, values):
            if v == -math.inf and len(c.strip()) > 1:
                raise LogprobsUnavailable(
                    f"continuation {c[:40]!r} is not a single token in the top log-probs of {self.base_url}/chat/"
                    "completions; to score longer continuations pass tokenizer=<the served model's tokenizer> "
                    "(scores via /completions with echo, which vLLM serve supports)")
        return values

    def reload_weights(self, path: str | os.PathLike) -> None:
        """Have a vLLM server load the checkpoint folder ``path`` (same architecture, readable by the
        server) in place: ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path":
        path}}`` on the server root, a development endpoint (``VLLM_SERVER_DEV_MODE=1``)."""
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        body = {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}
        try:
            resp = self._client.post(f"{root}/collective_rpc", json=body)
        except httpx.TransportError as exc:
            raise OpenAIError(f"{root}/collective_rpc: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 400:
            raise OpenAIError(f"{root}/collective_rpc answered HTTP {resp.status_code}: online training with "
                              "--backend openai needs a vLLM server started with VLLM_SERVER_DEV_MODE=1 (its "
                              "/collective_rpc reloads the policy's weights each step)", status=resp.status_code)

    @property
    def tokenizer(self) -> Any:
        if isinstance(self._tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer))
        return self._tokenizer

    def render(self, prompt: Messages) -> str:
        """The prompt text the served chat model continues (the tokenizer's chat template)."""
        return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)

    def _score_by_echo(self, prompt: Messages, continuations: list[str]) -> list[float]:
        """Any-length continuations: one ``/completions`` echo request for all of them."""
        text = self.render(prompt)
        if not all(continuations):
            raise ValueError("an empty continuation has no tokens to score")
        try:
            data = self.post("/completions", echo_payload(self.model, [text + c for c in continuations]))
        except OpenAIError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                raise LogprobsUnavailable(f"{self.base_url}/completions refused echo+logprobs scoring "
                                          f"(HTTP {exc.status}); vLLM serve supports it") from exc
            raise
        choices = sorted(data.get("choices") or [], key=lambda ch: ch.get("index", 0))
        values = [None if k >= len(choices) else echoed_span_logprob(choices[k], len(text), len(text) + len(c))
                  for k, c in enumerate(continuations)]
        if any(v is None for v in values):
            raise LogprobsUnavailable(f"{self.base_url}/completions returned no log-probs of the echoed prompt "
                                      "(echo with logprobs unsupported; vLLM serve supports it)")
        return values  # type: ignore[return-value]
