"""The vLLM backend on a real engine (CUDA and `pip install 'alignflow[vllm]'`): run by tests/gpu.sh,
skipped elsewhere. The same checks tests/test_generation_vllm.py makes against the recording fake:
log-prob parity with the hf backend on the same checkpoint (eos included), memory given back by
release(), weights reloaded in place, and an online run whose policy reaches the engine each step."""

from __future__ import annotations

import json

import pytest

from alignflow.schemas.generator import SamplingParams

pytestmark = pytest.mark.gpu
ENGINE = {"dtype": "float32", "gpu_memory_utilization": 0.25, "max_model_len": 256, "enforce_eager": True}


@pytest.fixture
def vllm_backend():
    pytest.importorskip("vllm")
    from alignflow.feedback.generation import vllm as backend

    yield backend
    backend.shutdown_engine()


def _prompts(toy_world, n=8):
    return [[{"role": "user", "content": p}] for p in toy_world.task.prompts(n, seed=7)]


def test_real_vllm_log_probs_match_hf_eos_included(vllm_backend, toy_world):
    from alignflow.feedback.generation.hf import HFGenerator

    engine = vllm_backend.VLLMGenerator(toy_world.path, **ENGINE)
    hf = HFGenerator(toy_world.path, device="cuda")
    prompts = _prompts(toy_world)
    gens = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=24, seed=3))
    flat_p = [p for p, g in zip(prompts, gens) for _ in g]
    flat = [x for g in gens for x in g]
    finished = [x.n_tokens < 24 for x in flat]
    assert any(finished)
    rescored = [hf.score_batch([p], [x.text], add_eos=f)[0] for p, x, f in zip(flat_p, flat, finished)]
    assert [x.logp for x in flat] == pytest.approx(rescored, abs=2e-3)
    texts = [x.text for x in flat]
    for add_eos in (True, False):
        assert engine.score_batch(flat_p, texts, add_eos=add_eos) == pytest.approx(
            hf.score_batch(flat_p, texts, add_eos=add_eos), abs=2e-3)


def test_real_vllm_release_frees_memory_and_reloads_weights(vllm_backend, toy_world, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.feedback.generation.hf import HFGenerator

    engine = vllm_backend.VLLMGenerator(toy_world.path, **ENGINE)
    msgs = _prompts(toy_world, 2)
    engine.score_batch(msgs, ["abc", "xyz"])
    free_awake = torch.cuda.mem_get_info()[0]
    engine.release()
    assert torch.cuda.mem_get_info()[0] > free_awake  # the KV cache and weights went back
    other = AutoModelForCausalLM.from_pretrained(toy_world.path)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(toy_world.path).save_pretrained(tmp_path / "other")
    engine.load_weights(tmp_path / "other")
    want = HFGenerator(tmp_path / "other", device="cuda").score_batch(msgs, ["abc", "xyz"], add_eos=True)
    assert engine.score_batch(msgs, ["abc", "xyz"], add_eos=True) == pytest.approx(want, abs=2e-3)


def test_real_vllm_online_rloo_pushes_the_policy_each_step(vllm_backend, toy_world, tmp_path):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    out = tmp_path / "run"
    options = [a for k, v in ENGINE.items() for a in ("-e", f"{k}={json.dumps(v)}")]
    res = CliRunner().invoke(app, ["online", "rloo", "--model", str(toy_world.path), "--output", str(out),
                                   "--device", "cuda", "--backend", "vllm", *options, "--num-prompts", "16",
                                   "--num-eval-prompts", "8", "-p", "steps=3", "-p", "prompts_per_step=4", "-p", "k=2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["weight_pushes"] == 3 and report["generations"] == 24
