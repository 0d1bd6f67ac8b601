"""Each family of offline losses raises the programmatic reward over the SFT policy, on the toy
world and (one loss per family) on the BPE world.

Data: K = 4 samples per prompt from the world's SFT model (HFGenerator, temperature 1), scored
with ``task.rewards``, turned into pairwise / listwise / binary datasets
(``trainers.sample_data``). Each family trains a fresh copy of the SFT model briefly; then the
reward of samples on a fixed set of held-out prompts (same sampling seeds before and after) must
rise, significantly: a one-sided paired t-test over prompts, p < 0.01.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

N_TRAIN_PROMPTS, K, N_EVAL_PROMPTS, EVAL_SAMPLES, MAX_NEW = 64, 4, 64, 2, 40


@pytest.fixture(scope="module")
def one_thread():
    # a ~0.5 M-parameter model: one thread is as fast and immune to OpenMP spinning on a busy CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(request, one_thread):
    """(built world, tokenizer, SFT model) of the case's world (indirect parameter), loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = request.getfixturevalue(f"{request.param}_world")
    return built, AutoTokenizer.from_pretrained(built.path), AutoModelForCausalLM.from_pretrained(built.path)


def _sample(model, tok, prompts, n, seed):
    from alignflow.feedback.generation.hf import HFGenerator
    from alignflow.schemas.generator import SamplingParams

    gen = HFGenerator(model, tok, device="cpu", batch_size=256)
    out = gen.generate([[{"role": "user", "content": p}] for p in prompts], n=n,
                       sampling=SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=seed))
    return [[g.text for g in gs] for gs in out]


@pytest.fixture(scope="module")
def samples(world):
    toy, tok, sft = world
    prompts = toy.task.prompts(N_TRAIN_PROMPTS, seed=7)
    responses = _sample(sft, tok, prompts, K, seed=0)
    rewards = [toy.task.rewards([p] * K, r).tolist() for p, r in zip(prompts, responses)]
    return prompts, responses, rewards


def eval_rewards(world, model) -> np.ndarray:
    """Mean reward per held-out prompt ``[N_EVAL_PROMPTS]`` (fixed prompts and sampling seed)."""
    toy, tok, _ = world
    prompts = toy.task.prompts(N_EVAL_PROMPTS, seed=99)
    responses = _sample(model, tok, prompts, EVAL_SAMPLES, seed=123)
    return np.array([toy.task.rewards([p] * EVAL_SAMPLES, r).mean() for p, r in zip(prompts, responses)])


@pytest.fixture(scope="module")
def sft_rewards(world):
    return eval_rewards(world, world[2])


def datasets(samples):
    from alignflow.trainers.sample_data import binary_from_samples, listwise_from_samples, pairwise_from_samples

    prompts, responses, rewards = samples
    best_worst = [[r[int(np.argmax(s))], r[int(np.argmin(s))]] for r, s in zip(responses, rewards)]
    best_worst_rewards = [[max(s), min(s)] for s in rewards]
    return {
        "pairwise": pairwise_from_samples(prompts, responses, rewards),
        "listwise": listwise_from_samples(prompts, responses, rewards),
        "binary": binary_from_samples(prompts, best_worst, best_worst_rewards),
        "negative": binary_from_samples(prompts, responses, rewards, only=False),
    }


FAMILIES = [  # family id, data, loss, params, learning rate
    ("pairwise-with-reference", "pairwise", "dpo", {}, 2e-4),
    ("reference-free", "pairwise", "orpo", {}, 2e-4),
    ("listwise", "listwise", "lipo", {}, 2e-4),
    ("binary", "binary", "kto", {}, 2e-4),
    ("negative-only", "negative", "npo", {}, 2e-5),
]
BPE_FAMILIES = ("pairwise-with-reference", "reference-free", "listwise", "binary")
CASES = [("toy", *f) for f in FAMILIES] + [("bpe", *f) for f in FAMILIES if f[0] in BPE_FAMILIES]


@pytest.mark.parametrize("world,family,data,loss,params,lr", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES],
                         indirect=["world"])
def test_family_raises_reward_significantly(world, samples, sft_rewards, tmp_path, family, data, loss, params, lr):
    from scipy import stats
    from transformers import AutoModelForCausalLM, TrainingArguments

    from alignflow.trainers.collators import pretokenize
    from alignflow.trainers.preference import PreferenceTrainer

    toy, tok, _ = world
    table = datasets(samples)[data]
    kind = "binary" if data == "negative" else data
    examples = pretokenize(table, kind, tok)
    assert len(examples) >= 32, f"too little {data} data from the samples: {len(examples)}"
    model = AutoModelForCausalLM.from_pretrained(toy.path)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=3,
                             learning_rate=lr, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_steps=5, use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    trainer = PreferenceTrainer(model, args, examples, kind=kind, loss=loss, loss_params=params, processing_class=tok)
    trainer.train()
    after = eval_rewards(world, model)
    p_value = stats.ttest_rel(after, sft_rewards, alternative="greater").pvalue
    print(f"{family} ({loss}): reward {sft_rewards.mean():.3f} -> {after.mean():.3f}, one-sided paired p = {p_value:.2g}")
    assert after.mean() > sft_rewards.mean()
    assert p_value < 0.01
