"""vLLM backend: request building and output parsing with fake vLLM-shaped objects, and the whole
backend against ``tests/fake_vllm`` (vLLM 0.33's API, every call checked, backed by the toy
checkpoint on the CPU): log-prob parity with the hf backend (eos included), engine options, one
engine per process, memory released before training, weights reloaded into the running engine."""

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
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 32, "seed": 5,
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


FAKE = __import__("pathlib").Path(__file__).parent / "fake_vllm"


@pytest.fixture
def fake_vllm(monkeypatch):
    """``import vllm`` gives the recording fake; no engine outlives the test."""
    import sys

    from alignflow.feedback.generation import vllm as backend
    from alignflow.flows import tasks

    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    vllm.ENGINES.clear()
    vllm.CALLS.clear()
    yield vllm
    tasks.clear_generators()
    backend.shutdown_engine()
    monkeypatch.delitem(sys.modules, "vllm", raising=False)


def _prompts(toy_world, n=4, seed=7):
    return [[{"role": "user", "content": p}] for p in toy_world.task.prompts(n, seed=seed)]


def test_fake_refuses_what_vllm_refuses(fake_vllm, toy_world):
    from alignflow.feedback.generation.vllm import VLLMGenerator

    with pytest.raises(TypeError, match="unexpected keyword argument 'max_len'"):
        fake_vllm.LLM(str(toy_world.path), max_len=64)
    with pytest.raises(TypeError, match="Unexpected keyword argument 'max_new_tokens'"):
        fake_vllm.SamplingParams(max_new_tokens=8)
    with pytest.raises(ValueError, match="temperature must be in"):
        fake_vllm.SamplingParams(temperature=2.5)
    with pytest.raises(ValueError, match="vllm engine option not accepted by vllm.LLM: .*'gpu_mem'"):
        VLLMGenerator(toy_world.path, gpu_mem=0.5)


def test_vllm_log_probs_match_hf_on_the_same_checkpoint_eos_included(fake_vllm, toy_world):
    """Generation-time log-probs (the sampled tokens', eos included when sampled) equal the hf
    backend's score of the same text; score_batch agrees with hf with and without add_eos."""
    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.feedback.generation.vllm import VLLMGenerator

    engine = VLLMGenerator(toy_world.path, dtype="float32", max_model_len=256)
    hf = HFGenerator(toy_world.path, device="cpu")
    prompts = _prompts(toy_world)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3)
    gens = engine.generate(prompts, n=2, sampling=sampling)
    flat_p = [p for p, g in zip(prompts, gens) for _ in g]
    flat = [x for g in gens for x in g]
    finished = [x.n_tokens < 24 for x in flat]
    assert any(finished), "some samples must end with eos for the check to mean anything"
    rescored = [hf.score_batch([p], [x.text], add_eos=f)[0] for p, x, f in zip(flat_p, flat, finished)]
    assert [x.logp for x in flat] == pytest.approx(rescored, abs=1e-4)
    texts = [x.text for x in flat]
    for add_eos in (True, False):
        got, counts = engine.score_batch(flat_p, texts, add_eos=add_eos, return_tokens=True)
        want, want_counts = hf.score_batch(flat_p, texts, add_eos=add_eos, return_tokens=True)
        assert got == pytest.approx(want, abs=1e-4) and counts == want_counts
    generate = [c for c in engine.llm.calls if c[0] == "generate"]
    prompt = generate[0][1]["prompts"][0]
    assert prompt == {"prompt_token_ids": hf.prompt_ids(prompts[0])}  # a TokensPrompt of hf's prompt ids
    params = generate[0][1]["sampling_params"]
    assert (params.n, params.logprobs, params.seed, params.max_tokens, params.top_k) == (2, 0, 3, 24, 0)
    assert generate[-1][1]["sampling_params"].prompt_logprobs == 0
    assert engine.llm.args["logprobs_mode"] == "raw_logprobs"


def test_one_engine_per_process_released_for_training_and_reloaded(fake_vllm, toy_world, tmp_path):
    """A second engine shuts the first down; release() sleeps (level 2); the next call wakes it in
    vLLM's documented order with the weights reloaded; load_weights swaps a trained checkpoint in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.feedback.generation.vllm import VLLMGenerator, active_engine

    first = VLLMGenerator(toy_world.path)
    second = VLLMGenerator(toy_world.path)
    assert first.closed and active_engine() is second and fake_vllm.ENGINES[0].shut_down
    with pytest.raises(RuntimeError, match="shut down"):
        first.generate(_prompts(toy_world, 1))
    second.release()
    assert second.llm.calls[-1] == ("sleep", {"level": 2, "mode": "abort"})
    other = AutoModelForCausalLM.from_pretrained(toy_world.path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(toy_world.path).save_pretrained(tmp_path / "other")
    assert second.can_load(tmp_path / "other")
    second.load_weights(tmp_path / "other")
    names = [c[0] for c in second.llm.calls]
    assert names[-3:] == ["wake_up", "collective_rpc", "wake_up"]
    assert second.llm.calls[-3][1]["tags"] == ["weights"] and second.llm.calls[-1][1]["tags"] == ["kv_cache"]
    assert second.llm.calls[-2][1]["kwargs"] == {"weights_path": str(tmp_path / "other")}
    msgs = _prompts(toy_world, 2)
    want = HFGenerator(tmp_path / "other", device="cpu").score_batch(msgs, ["abc", "xyz"], add_eos=True)
    assert second.score_batch(msgs, ["abc", "xyz"], add_eos=True) == pytest.approx(want, abs=1e-4)
    second.release()
    second.score_batch(msgs[:1], ["abc"])  # woken again with the weights it held
    assert second.llm.calls[-3][1]["kwargs"] == {"weights_path": str(tmp_path / "other")}
    assert len(fake_vllm.ENGINES) == 2 and second.weight_loads == 2


def test_flow_engine_options_pass_through_and_evaluation_uses_one_engine(fake_vllm, toy_world, tmp_path):
    """generation.engine options reach vllm.LLM; evaluate_policy scores policy and start in ONE
    engine (the start's weights loaded in place), KL from add_eos scores equal to hf's."""
    import shutil

    from alignflow.flows.config import load_config
    from alignflow.flows.tasks import _backend_options, evaluate_policy, prepare_prompts

    cfg = load_config("align", None, ["generation.backend=vllm", "generation.engine.gpu_memory_utilization=0.4",
                                      "generation.engine.tensor_parallel_size=1", "generation.engine.max_model_len=256",
                                      "generation.engine.dtype=float32", "generation.engine.enable_prefix_caching=true"])
    options = _backend_options("vllm", cfg.generation.model_dump())
    prompts = prepare_prompts(str(tmp_path / "p"), n=3, seed=1)
    copy = tmp_path / "copy"  # another checkpoint folder with the start's weights: KL 0 to the start
    shutil.copytree(toy_world.path, copy)
    hf_eval = evaluate_policy(str(tmp_path / "hf.json"), model=str(copy), initial=str(toy_world.path),
                              prompts=prompts, judge={"type": "verifier"}, k=2, temperature=1.0, max_new_tokens=16,
                              seed=0, backend="hf")
    result = evaluate_policy(str(tmp_path / "eval.json"), model=str(copy), initial=str(toy_world.path),
                             prompts=prompts, judge={"type": "verifier"}, k=2, temperature=1.0, max_new_tokens=16,
                             seed=0, backend="vllm", generation=cfg.generation.model_dump())
    assert len(fake_vllm.ENGINES) == 1  # the start's weights were loaded into the policy's engine
    reloads = [c[1]["kwargs"]["weights_path"] for c in fake_vllm.ENGINES[0].calls if c[0] == "collective_rpc"]
    assert reloads == [str(toy_world.path)]
    args = fake_vllm.ENGINES[0].args
    assert {k: args[k] for k in options} == {"gpu_memory_utilization": 0.4, "tensor_parallel_size": 1,
                                             "max_model_len": 256, "dtype": "float32", "enable_prefix_caching": True}
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) == hf_eval["kl"]  # same checkpoint: KL 0 on both
    assert result["n"] == 6
