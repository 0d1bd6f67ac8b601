"""vLLM backend: request building and output parsing with fake vLLM-shaped objects."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from alignflow.feedback.generation.vllm import (
    build_score_requests,
    continuation_logp,
    parse_request_outputs,
    sampling_kwargs,
    score_kwargs,
)
from alignflow.schemas.generator import SamplingParams


def LP(v):
    return NS(logprob=v, rank=1, decoded_token="?")


def test_sampling_kwargs():
    kw = sampling_kwargs(4, SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=32, seed=5, stop=("\n",)))
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 32, "seed": 5,
                  "stop": ["\n"], "logprobs": 0}
    assert sampling_kwargs(1, SamplingParams(top_k=20), logprobs=None, prompt_logprobs=0)["prompt_logprobs"] == 0
    assert "logprobs" not in sampling_kwargs(1, SamplingParams(), logprobs=None)
    assert score_kwargs() == {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}


def test_parse_request_outputs_sums_sampled_token_logprobs():
    comp_a = NS(index=1, text="ab", token_ids=[5, 6], cumulative_logprob=-9.0,
                logprobs=[{5: LP(-0.5), 9: LP(-2.0)}, {6: LP(-0.25)}])
    comp_b = NS(index=0, text="x", token_ids=[7], cumulative_logprob=-1.5, logprobs=None)
    out = parse_request_outputs([NS(outputs=[comp_a, comp_b]), NS(outputs=[])])
    assert [g.text for g in out[0]] == ["x", "ab"] and out[1] == []
    assert out[0][0].logp == -1.5 and out[0][0].n_tokens == 1  # falls back to cumulative_logprob
    assert out[0][1].logp == pytest.approx(-0.75) and out[0][1].token_logps == [-0.5, -0.25]


def test_continuation_logp_from_prompt_logprobs():
    ids = [1, 10, 11, 12, 13]
    plp = [None, {10: LP(-1.0)}, {11: LP(-2.0)}, {12: LP(-0.5), 3: LP(-0.1)}, {13: LP(-0.25)}]
    assert continuation_logp(plp, ids, start=3) == pytest.approx(-0.75)
    with pytest.raises(ValueError):
        continuation_logp(plp, ids, start=0)
    reqs = build_score_requests([1, 2], [[3], [4, 5]])
    assert reqs == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [1, 2, 4, 5]}]


def test_vllm_missing_gives_install_hint():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm installed")
    from alignflow.feedback.generation.registry import make_generator

    with pytest.raises(ImportError, match="alignflow\\[vllm\\]"):
        make_generator("vllm", "some/model")
    with pytest.raises(ValueError, match="unknown generation backend"):
        make_generator("nope", "m")
