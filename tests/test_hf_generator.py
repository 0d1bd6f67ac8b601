"""The ``hf`` generation backend on tiny random models of both worlds' shapes (no SFT needed): a
char-level Llama and a byte-level BPE Qwen2 (ChatML, no bos, eos <|im_end|>, pad distinct)."""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

from alignflow.feedback.generation.hf import HFGenerator  # noqa: E402
from alignflow.schemas.generator import Generator, SamplingParams  # noqa: E402
from tests.tiny import TOKENIZERS, tiny_lm, tokenizer  # noqa: E402


@pytest.fixture(scope="module", params=TOKENIZERS)
def generator(request):
    tok = tokenizer(request.param)
    return HFGenerator(tiny_lm(tok, hidden_size=32, num_layers=2, seed=1), tok, device="cpu", batch_size=8)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


PROMPTS = [user("Spell out: 7"), user("a much longer prompt, to force left padding: 123"), user("hi")]


def test_satisfies_protocol(generator):
    assert isinstance(generator, Generator)
    assert generator.name == "hf"


def test_n_samples_per_prompt_and_token_counts(generator):
    out = generator.generate(PROMPTS, n=3, sampling=SamplingParams(max_new_tokens=12, seed=0))
    assert [len(gens) for gens in out] == [3, 3, 3]
    for gens in out:
        for g in gens:
            assert 1 <= g.n_tokens <= 12
            assert len(g.token_logps) == g.n_tokens
            assert math.isclose(g.logp, sum(g.token_logps), rel_tol=1e-6)
            assert g.logp < 0
    # A random model spreads its mass: the 3 samples of a prompt are not all the same.
    assert any(len({g.text for g in gens}) > 1 for gens in out)


def test_seeded_sampling_is_deterministic_and_batch_invariant(generator):
    sampling = SamplingParams(max_new_tokens=10, seed=123)
    first = generator.generate(PROMPTS, n=2, sampling=sampling)
    second = generator.generate(PROMPTS, n=2, sampling=sampling)
    assert [[g.text for g in gens] for gens in first] == [[g.text for g in gens] for gens in second]
    # Each row has its own random stream: the first prompt alone (no padding, other batch)
    # gets the same samples as inside the padded batch.
    alone = HFGenerator(generator.model, generator.tokenizer, device="cpu", batch_size=1, num_threads=1)
    solo = alone.generate(PROMPTS[:1], n=2, sampling=sampling)
    assert [g.text for g in solo[0]] == [g.text for g in first[0]]
    for a, b in zip(solo[0], first[0]):
        assert a.logp == pytest.approx(b.logp, abs=1e-4)
    other = generator.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=10, seed=124))
    assert [[g.text for g in gens] for gens in other] != [[g.text for g in gens] for gens in first]


def test_greedy_left_padded_equals_single_prompt(generator):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    batched = generator.generate(PROMPTS, n=1, sampling=greedy)
    for prompt, gens in zip(PROMPTS, batched):
        single = generator.generate([prompt], n=1, sampling=greedy)[0][0]
        assert single.text == gens[0].text
        assert single.logp == pytest.approx(gens[0].logp, abs=1e-4)


def _manual_logp(generator, prompt, continuation, add_eos=False):
    """Unbatched, unpadded log-prob of the continuation tokens from a plain forward pass."""
    prompt_ids = generator.prompt_ids(prompt)
    cont_ids = generator.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if add_eos:
        cont_ids = cont_ids + [generator.tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + cont_ids])
    with torch.no_grad():
        logprobs = generator.model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(prompt_ids) + t - 1, tok]) for t, tok in enumerate(cont_ids))


def test_score_matches_manual_logprob(generator):
    continuations = ["seven", "x", "a rather longer continuation"]
    scores = generator.score(PROMPTS[0], continuations)
    for cont, got in zip(continuations, scores):
        assert got == pytest.approx(_manual_logp(generator, PROMPTS[0], cont), abs=1e-4)
    batch = generator.score_batch([PROMPTS[1], PROMPTS[2]], ["ab", "cde"], add_eos=True)
    assert batch[0] == pytest.approx(_manual_logp(generator, PROMPTS[1], "ab", add_eos=True), abs=1e-4)
    assert batch[1] == pytest.approx(_manual_logp(generator, PROMPTS[2], "cde", add_eos=True), abs=1e-4)


def test_generation_logp_equals_score_of_its_text(generator):
    out = generator.generate(PROMPTS[:2], n=8, sampling=SamplingParams(max_new_tokens=6, seed=5))
    checked = 0
    for prompt, gens in zip(PROMPTS, out):
        for g in gens:
            # A random model samples special tokens (decoding drops them) and, with BPE, token
            # sequences that are not the text's own tokenization: compare the texts whose own
            # tokenization has as many tokens as were sampled.
            if g.n_tokens != len(generator.tokenizer(g.text, add_special_tokens=False)["input_ids"]):
                continue
            again = generator.score_batch([prompt], [g.text])[0]
            assert again == pytest.approx(g.logp, abs=1e-3)
            checked += 1
    assert checked >= 1


def test_top_k_one_is_greedy(generator):
    greedy = generator.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))
    top1 = generator.generate(PROMPTS, n=1, sampling=SamplingParams(top_k=1, max_new_tokens=8, seed=3))
    assert [g[0].text for g in greedy] == [g[0].text for g in top1]


def test_stop_string_truncates(generator):
    out = generator.generate(PROMPTS[:1], n=4, sampling=SamplingParams(max_new_tokens=30, seed=9))
    text = next(g.text for g in out[0] if len(g.text) >= 3)
    stop = text[1:3]
    again = generator.generate(PROMPTS[:1], n=4, sampling=SamplingParams(max_new_tokens=30, seed=9, stop=(stop,)))
    for plain, stopped in zip(out[0], again[0]):
        cut = plain.text.find(stop)
        assert stopped.text == (plain.text[:cut] if cut >= 0 else plain.text)
        assert stop not in stopped.text


def test_live_model_mode_is_restored(generator):
    generator.model.train()
    try:
        generator.generate(PROMPTS[:1], n=1, sampling=SamplingParams(max_new_tokens=3, seed=0))
        generator.score(PROMPTS[0], ["ab"])
        assert generator.model.training
    finally:
        generator.model.eval()
    assert generator.num_threads == 1  # "auto" on a tiny CPU model


def test_tokenizer_without_chat_template_falls_back_to_plain_text(generator):
    from alignflow.trainers.sft import tokenize_sft_example

    plain = copy.deepcopy(generator.tokenizer)
    plain.chat_template = None
    bare = HFGenerator(generator.model, plain, device="cpu")
    ids = bare.prompt_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert plain.decode(ids) == "be brief\n\nhi"
    row = tokenize_sft_example(plain, "hi", "yo")
    assert row["input_ids"][: len(bare.prompt_ids("hi"))] == bare.prompt_ids("hi")
    assert bare.generate(["hi"], n=2, sampling=SamplingParams(max_new_tokens=4, seed=0))[0][1].n_tokens >= 1
