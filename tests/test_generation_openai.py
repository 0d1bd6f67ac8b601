"""OpenAI-compatible backend: retries/backoff (httpx.MockTransport), parsing, log-probs, and a
real ``transformers serve`` process on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from alignflow.feedback.generation.openai import (
    LogprobsUnavailable,
    OpenAIError,
    OpenAIGenerator,
    backoff_delay,
    chat_payload,
    echo_payload,
    echoed_span_logprob,
    lookup_continuations,
    parse_chat_choices,
)
from alignflow.schemas.generator import SamplingParams

MSG = [{"role": "user", "content": "Reverse: abc"}]


def _answer(text="cba", logprobs=None, n=1):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"choices": [dict(choice, index=i) for i in range(n)], "usage": {"completion_tokens": 3 * n}}


def _gen(handler, **kw):
    sleeps = []
    gen = OpenAIGenerator("toy", base_url="http://test/v1", api_key="sk-secret-123",
                          transport=httpx.MockTransport(handler), sleep=sleeps.append, **kw)
    return gen, sleeps


def test_retries_429_then_succeeds_with_retry_after():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "2"}, json={"error": "slow down"})
        return httpx.Response(200, json=_answer())

    gen, sleeps = _gen(handler)
    out = gen.generate([MSG])
    assert out[0][0].text == "cba" and len(calls) == 2 and sleeps == [2.0]
    assert calls[0].headers["authorization"] == "Bearer sk-secret-123"


def test_retries_503_and_timeout_with_exponential_backoff():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, text="overloaded")
        if len(calls) == 2:
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(200, json=_answer())

    gen, sleeps = _gen(handler, backoff=0.5)
    assert gen.generate([MSG])[0][0].text == "cba"
    assert len(calls) == 3 and gen.retries_done == 2
    assert 0.5 <= sleeps[0] <= 0.55 and 1.0 <= sleeps[1] <= 1.1  # base * 2**attempt (+<=10% jitter)


def test_gives_up_after_max_retries_and_4xx_fails_at_once():
    gen, sleeps = _gen(lambda r: httpx.Response(500, text="boom"), max_retries=3)
    with pytest.raises(OpenAIError, match="gave up after 4 attempts"):
        gen.generate([MSG])
    assert len(sleeps) == 3
    gen, sleeps = _gen(lambda r: httpx.Response(400, json={"error": "bad"}))
    with pytest.raises(OpenAIError, match="HTTP 400") as err:
        gen.generate([MSG])
    assert sleeps == [] and "sk-secret" not in str(err.value)


def test_backoff_is_capped():
    assert backoff_delay(10, 0.5, 30.0) <= 33.0
    assert backoff_delay(0, 1.0, 30.0, retry_after="not-a-number") >= 1.0


def test_concurrency_limit_is_respected():
    active, peak, lock = [0], [0], threading.Lock()

    def handler(request):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return httpx.Response(200, json=_answer())

    gen, _ = _gen(handler, max_concurrency=3)
    out = gen.generate([MSG] * 12)
    assert len(out) == 12 and 2 <= peak[0] <= 3


def test_logprobs_summed_when_returned_and_absent_otherwise():
    lps = [{"token": t, "logprob": v, "top_logprobs": []} for t, v in (("c", -0.5), ("b", -0.25), ("a", -1.0))]
    g = parse_chat_choices(_answer(logprobs=lps))[0]
    assert g.logp == pytest.approx(-1.75) and g.n_tokens == 3 and g.token_logps == [-0.5, -0.25, -1.0]
    g = parse_chat_choices(_answer())[0]
    assert g.logp is None and g.n_tokens == 3


def test_fewer_choices_than_n_are_topped_up_with_distinct_seeds():
    seeds = []

    def handler(request):
        body = json.loads(request.content)
        seeds.append(body["seed"])
        return httpx.Response(200, json=_answer(f"s{len(seeds)}"))  # ignores n: one choice

    gen, _ = _gen(handler)
    out = gen.generate([MSG], n=3, sampling=SamplingParams(seed=7))
    assert [g.text for g in out[0]] == ["s1", "s2", "s3"] and len(set(seeds)) == 3


def test_score_reads_top_logprobs_and_raises_without_them():
    def with_lp(request):
        body = json.loads(request.content)
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        top = [{"token": "1", "logprob": -0.2}, {"token": " 2", "logprob": -1.8}]
        return httpx.Response(200, json=_answer("1", [{"token": "1", "logprob": -0.2, "top_logprobs": top}]))

    gen, _ = _gen(with_lp)
    assert gen.score(MSG, ["1", "2", "3"]) == [-0.2, -1.8, float("-inf")]
    gen, _ = _gen(lambda r: httpx.Response(200, json=_answer("1")))
    with pytest.raises(LogprobsUnavailable):
        gen.score(MSG, ["1", "2"])
    assert gen.logprobs_supported is False
    assert lookup_continuations({"A": -1.0}, ["A", " A"]) == [-1.0, -1.0]


class _TagTemplate:
    """Stands in for the served model's tokenizer: only its chat template is used."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def _fake_vllm_echo(requests):
    """A vLLM-like ``/completions`` answer to echo=True, logprobs=1: tokens are whitespace-led
    words (so one can straddle the prompt/continuation boundary), log-prob -0.5 per character,
    none for the first token; then one generated token "!"."""
    import re

    def handler(request):
        body = json.loads(request.content)
        requests.append((request.url.path, body))
        choices = []
        for i, text in enumerate(body["prompt"]):
            tokens = re.findall(r"\s*\S+", text)
            offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
            logps = [None] + [-0.5 * len(t) for t in tokens[1:]]
            choices.append({"index": i, "text": text + "!", "logprobs": {
                "tokens": tokens + ["!"], "token_logprobs": logps + [-9.0], "text_offset": offsets + [len(text)],
                "top_logprobs": None}})
        return httpx.Response(200, json={"choices": choices[::-1]})  # order by "index", not position

    return handler


def test_multi_token_score_by_completions_echo():
    requests = []
    gen, _ = _gen(_fake_vllm_echo(requests), tokenizer=_TagTemplate())
    # rendered prompt "<user>Reverse: abc<assistant>"; its last token " abc<assistant>" (15 chars)
    # runs into a continuation that starts without a space, so it counts for the continuation
    got = gen.score(MSG, [" cba", "c ba", "2 because", " a b c"])
    assert got == [-2.0, -0.5 * 16 - 1.5, -0.5 * 16 - 4.0, -3.0]
    assert len(requests) == 1  # one request answers every continuation of a prompt
    path, body = requests[0]
    assert path == "/v1/completions" and body == echo_payload("toy", [
        "<user>Reverse: abc<assistant>" + c for c in (" cba", "c ba", "2 because", " a b c")])
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 1
    # flat pairs over two prompts: one request per distinct prompt
    other = [{"role": "user", "content": "Copy: q"}]
    assert gen.score_batch([MSG, other, MSG], [" cba", " q", " x y"]) == [-2.0, -1.0, -2.0]
    assert len(requests) == 3
    assert echoed_span_logprob({"logprobs": None}, 0, 3) is None


def test_echo_scoring_fails_in_one_clear_line_where_unsupported():
    # a server that echoes but sends no log-probs (or no /completions at all): LogprobsUnavailable,
    # which an "auto" judge takes as the cue to generate-and-parse
    gen, _ = _gen(lambda r: httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "logprobs": None}]}),
                  tokenizer=_TagTemplate())
    with pytest.raises(LogprobsUnavailable, match="no log-probs of the echoed prompt") as err:
        gen.score(MSG, ["1 2"])
    assert "\n" not in str(err.value)
    gen, _ = _gen(lambda r: httpx.Response(404, json={"error": "not found"}), tokenizer=_TagTemplate())
    with pytest.raises(LogprobsUnavailable, match="HTTP 404"):
        gen.score(MSG, ["1 2"])
    # without a tokenizer the chat route reads one position: a longer continuation names the fix
    top = [{"token": "1", "logprob": -0.2}, {"token": "2", "logprob": -1.8}]
    gen, _ = _gen(lambda r: httpx.Response(200, json=_answer("1", [{"token": "1", "logprob": -0.2, "top_logprobs": top}])))
    with pytest.raises(LogprobsUnavailable, match="tokenizer=") as err:
        gen.score(MSG, ["1", "2 because"])
    assert "\n" not in str(err.value)


def test_echo_route_is_in_provenance_and_the_judge_does_not_load_the_tokenizer():
    from alignflow.feedback.judges.scoring import GeneratorScorer, make_scorer

    gen, _ = _gen(lambda r: httpx.Response(500), tokenizer="no/such-tokenizer")
    assert isinstance(make_scorer(gen), GeneratorScorer)  # an HTTP client: scored by the server
    assert gen._tokenizer == "no/such-tokenizer"  # still a name: loaded on first scoring, not here
    assert gen.provenance()["tokenizer"] == "no/such-tokenizer"
    assert "tokenizer" not in _gen(lambda r: httpx.Response(500))[0].provenance()
    assert echo_payload("m", ["x"])["add_special_tokens"] is False  # the chat template wrote the BOS


def test_payload_and_no_secret_in_repr_or_provenance():
    body = chat_payload("m", MSG, 2, SamplingParams(temperature=0.5, top_k=5, stop=("\n",)), seed=3)
    assert body["n"] == 2 and body["top_k"] == 5 and body["stop"] == ["\n"] and body["seed"] == 3
    gen, _ = _gen(lambda r: httpx.Response(200, json=_answer()))
    assert "sk-secret" not in repr(gen) and "sk-secret" not in json.dumps(gen.provenance())


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_API_KEY", "env-key")
    seen = []
    gen = OpenAIGenerator("m", base_url="http://t/v1", transport=httpx.MockTransport(
        lambda r: seen.append(r.headers.get("authorization")) or httpx.Response(200, json=_answer())))
    gen.generate([MSG])
    assert seen == ["Bearer env-key"]


# --- a real server ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint

    tok = make_char_tokenizer()
    # A context that holds the judge prompt (about 520 tokens): transformers serve >= 5.25 refuses
    # prompts longer than the model's max_position_embeddings with HTTP 400.
    model = make_tiny_llama(tok, hidden_size=32, max_position_embeddings=1024)
    path = save_checkpoint(model, tok, tmp_path_factory.mktemp("served") / "toy")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen([cli, "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("transformers serve did not come up in 60 s")
            time.sleep(0.3)
        yield base + "/v1", str(path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_against_transformers_serve(served_model):
    from alignflow.feedback.judges import PairwiseJudge

    base_url, model = served_model
    with OpenAIGenerator(model, base_url=base_url, max_concurrency=2, timeout=60) as gen:
        out = gen.generate([MSG, [{"role": "user", "content": "Copy exactly: xy"}]], n=2,
                           sampling=SamplingParams(temperature=1.0, max_new_tokens=6, seed=1))
        assert [len(g) for g in out] == [2, 2]
        assert all(isinstance(g.text, str) and g.n_tokens >= 0 for gens in out for g in gens)
        assert gen.logprobs_supported is not None  # learnt from the first answer
        # transformers serve ignores logprobs: score says so, and the judge falls back to text
        if gen.logprobs_supported is False:
            with pytest.raises(LogprobsUnavailable):
                gen.score(MSG, ["1", "2"])
        res = PairwiseJudge(gen, verdict_tokens=4).judge(["Reverse: ab"], ["ba"], ["ab"])
        assert res.method == ("generate" if gen.logprobs_supported is False else "logprobs")
        assert 0.0 <= res.judge_prob[0] <= 1.0 and res.consistent.dtype == bool


def _hf_echo_server(model_path, requests):
    """A vLLM-serve-shaped ``/completions`` echo answered by the checkpoint itself (transformers on
    the CPU): each prompt text tokenized as vLLM does (``add_special_tokens=False``), every token's
    log-prob under the model (the first None), ``text_offset`` from the tokenizer's offsets."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()

    def handler(request):
        body = json.loads(request.content)
        requests.append((request.url.path, body))
        choices = []
        for i, text in enumerate(body["prompt"]):
            enc = tok(text, add_special_tokens=body.get("add_special_tokens", True), return_offsets_mapping=True)
            ids = enc["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            values = [None] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
            offsets = [start for start, _ in enc["offset_mapping"]]
            choices.append({"index": i, "text": text + "x", "logprobs": {
                "tokens": [tok.decode([t]) for t in ids] + ["x"], "token_logprobs": values + [-1.0],
                "text_offset": offsets + [len(text)]}})
        return httpx.Response(200, json={"choices": choices})

    return handler


def test_echo_scoring_with_eos_matches_the_hf_backend(toy_world):
    """score_batch(add_eos=True) through /completions echo equals the hf backend's on the same
    checkpoint, eos included (the KL of a run then does not depend on the backend)."""
    from alignflow.feedback.generation.hf import HFGenerator

    requests = []
    gen, _ = _gen(_hf_echo_server(toy_world.path, requests), tokenizer=str(toy_world.path))
    hf = HFGenerator(toy_world.path, device="cpu")
    prompts = [[{"role": "user", "content": p}] for p in toy_world.task.prompts(3, seed=5)]
    texts = ["forty-two", "", "DLROW"]
    for add_eos in (True, False):
        pairs = [(p, t) for p, t in zip(prompts, texts) if t or add_eos]  # an empty text has nothing but its eos
        got = gen.score_batch([p for p, _ in pairs], [t for _, t in pairs], add_eos=add_eos)
        want = hf.score_batch([p for p, _ in pairs], [t for _, t in pairs], add_eos=add_eos)
        assert got == pytest.approx(want, abs=1e-4)
    assert requests[0][1]["prompt"][0].endswith("forty-two<eos>")
    gen_no_tok, _ = _gen(lambda r: httpx.Response(500))
    with pytest.raises(LogprobsUnavailable, match="add_eos=True needs tokenizer="):
        gen_no_tok.score_batch(prompts[:1], ["x"], add_eos=True)


def test_reload_weights_asks_a_vllm_server_to_load_the_checkpoint():
    calls = []

    def handler(request):
        calls.append((str(request.url), json.loads(request.content)))
        return httpx.Response(200 if len(calls) == 1 else 404, json={})

    gen, _ = _gen(handler)
    gen.reload_weights("/runs/x/engine-weights")
    assert calls == [("http://test/collective_rpc", {"method": "reload_weights",
                                                     "kwargs": {"weights_path": "/runs/x/engine-weights"}})]
    with pytest.raises(OpenAIError, match="VLLM_SERVER_DEV_MODE=1"):
        gen.reload_weights("/runs/x/engine-weights")
