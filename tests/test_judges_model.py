"""Judges on a real (tiny, random) transformers model of each world's shape (char-level Llama,
byte-level BPE Qwen2 with ChatML): prefix-cached scoring equals plain scoring, order symmetry of
the debiased probability, table helpers, reward-model judge, and the agreement metric on real
human-label files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pytest

from alignflow.feedback.judges import (
    ListwiseJudge,
    PairwiseJudge,
    PrefixCachedScorer,
    RubricJudge,
    agreement,
    length_bias,
)
from alignflow.feedback.judges.tables import candidate_pairs, label_pairs, rank_samples, score_samples
from alignflow.schemas.validate import validate
from tests.tiny import TOKENIZERS, tiny_lm, tokenizer


@pytest.fixture(scope="module", params=TOKENIZERS)
def gen(request):
    from alignflow.feedback.generation.hf import HFGenerator

    tok = tokenizer(request.param)
    return HFGenerator(tiny_lm(tok, hidden_size=32, num_layers=1, seed=3), tok, device="cpu", batch_size=16)


def test_prefix_cached_scorer_equals_plain_scoring(gen):
    judge = PairwiseJudge(gen)
    assert isinstance(judge.scorer, PrefixCachedScorer)
    words = ("abc", "xyz", "hello")
    # both orders of each pair: rows that share the request beyond the preamble (level-2 groups)
    msgs = [judge.template.messages(f"Reverse: {w}", a, b) for w in words for a, b in ((w[::-1], w), (w, w[::-1]))]
    conts = [["1", "2"], ["1", "2"], ["1", "2 because"], ["1", "2"], ["x", "22"], ["2", "1"]]
    scorer = PrefixCachedScorer(gen.model, gen.tokenizer, batch_size=4)
    from alignflow.feedback.judges.scoring import _common_prefix_len

    rows = scorer._plan(msgs, [["1"]] * 6)[0]
    P = _common_prefix_len(rows)  # the preamble
    groups = scorer._groups(rows, P, [10_000] * 6)
    assert sorted(sorted(g.rows) for g in groups) == [[0, 1], [2, 3], [4, 5]]  # the two orders of each pair
    assert all(g.end >= P + 8 for g in groups)
    got = scorer.score_batch(msgs, conts)
    flat_p = [m for m, cs in zip(msgs, conts) for _ in cs]
    ref = gen.score_batch(flat_p, [c for cs in conts for c in cs])
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-5)
    assert scorer.prefix_hits == 0
    again = scorer.score_batch(msgs[:3], conts[:3])  # another call (other batches, no level-2 partner for row 3)
    assert scorer.prefix_hits == 1  # the shared preamble was computed once and reused
    np.testing.assert_allclose(np.concatenate(again), np.concatenate(got[:3]), atol=1e-5)


@pytest.mark.parametrize("path", ["kv-buffers", "generic-cache", "no-shared-preamble", "small-chunks"])
def test_prefix_cached_scorer_paths_agree_with_plain_scoring(gen, path, monkeypatch):
    """Every path of the scorer (preallocated key/value buffers; copied caches for other cache
    layer types; no call-wide prefix but level-2 groups; groups a few at a time) gives the log-probs of scoring each
    full sequence from scratch, for one- and many-token continuations."""
    from alignflow.feedback.judges import scoring

    if path == "generic-cache":
        monkeypatch.setattr(scoring, "_plain_layers", lambda cache: False)
    if path == "no-shared-preamble":  # rows differ from their first characters on
        msgs = [[{"role": "user", "content": f"{w}: a shared request about {w}, long enough; answer {x}"}]
                for w in ("abc", "xyz", "hello") for x in ("yes", "no")]
    else:
        template = PairwiseJudge(gen).template
        msgs = [template.messages(f"Reverse: {w}", a, b) for w in ("abc", "hello") for a, b in ((w[::-1], w), (w, w[::-1]))]
        msgs += [template.messages("Copy: q", "q", "qq"), template.messages("Copy: q", "qq", "q")]
    conts = [["1", "2"], ["1", "2 because"], ["x", "22"], ["2", "1"], ["1"], ["12", "1"]]
    # "small-chunks": levels 2 and 3 a pair (2 rows) at a time
    scorer = PrefixCachedScorer(gen.model, gen.tokenizer, batch_size=3, chunk_rows=2 if path == "small-chunks" else None)
    got = scorer.score_batch(msgs, conts)
    flat_p = [m for m, cs in zip(msgs, conts) for _ in cs]
    ref = gen.score_batch(flat_p, [c for cs in conts for c in cs])
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-5)
    assert (scorer._prefix_ids is None) == (path == "no-shared-preamble")


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_kept_prefix_cache_is_recomputed_after_the_weights_change(kind):
    """A judge over a live model (online training): the preamble's cache kept from an earlier
    call must not outlive an in-place weight update."""
    import torch

    from alignflow.feedback.generation.hf import HFGenerator

    tok = tokenizer(kind)
    live = HFGenerator(tiny_lm(tok, hidden_size=16, num_layers=1, seed=5), tok, device="cpu")
    judge = PairwiseJudge(live)
    msgs = [judge.template.messages("Reverse: ab", "ba", "ab")]
    first = judge.scorer.score_batch(msgs, [["1", "2"]])
    with torch.no_grad():  # what an optimizer step does: in place
        live.model.get_input_embeddings().weight.mul_(1.5)
    second = judge.scorer.score_batch(msgs, [["1", "2"]])
    assert judge.scorer.prefix_hits == 0 and second != first
    np.testing.assert_allclose(second[0], live.score_batch(msgs * 2, ["1", "2"]), atol=1e-5)
    assert judge.scorer.score_batch(msgs, [["1", "2"]]) == second and judge.scorer.prefix_hits == 1


def test_debiased_probability_is_order_symmetric(gen):
    judge = PairwiseJudge(gen)
    a, b = ["cba", "XY!"], ["abc", "XY"]
    prompts = ["Reverse: abc", "Write in capitals: xy"]
    ab, ba = judge.judge(prompts, a, b), judge.judge(prompts, b, a)
    np.testing.assert_allclose(ab.judge_prob + ba.judge_prob, 1.0, atol=1e-6)
    np.testing.assert_array_equal(ab.consistent, ba.consistent)
    gen_mode = PairwiseJudge(gen, mode="generate", verdict_tokens=3).judge(prompts, a, b)
    assert gen_mode.method == "generate" and set(np.unique(gen_mode.p_ab)) <= {0.0, 0.5, 1.0}


def test_table_helpers_write_valid_kinds(gen, tmp_path):
    samples = pa.table({"prompt_id": ["p", "p", "p", "q", "q"],
                        "prompt": ["Reverse: ab", "Reverse: ab", "Reverse: ab", "Copy exactly: c", "Copy exactly: c"],
                        "response": ["ba", "ab", "b", "c", "c"]})
    cands = candidate_pairs(samples, pairs_per_prompt=2, seed=0)
    assert cands.num_rows == 2  # "q" has one distinct response: no pair
    pairs, result, counts = label_pairs(cands, PairwiseJudge(gen, tie_band=0.0))
    assert counts["candidates"] == 2 and counts["labelled"] + counts["ties_dropped"] == 2
    assert validate(pairs, "pairwise").quarantined.num_rows == 0
    assert (pairs["judge_prob"].to_numpy() >= 0.5).all()
    scored = score_samples(samples, RubricJudge(gen))
    r = scored["reward"].to_numpy()
    assert ((r >= 0) & (r <= 5)).all() and len(np.unique(r)) > 1
    lw = rank_samples(samples.slice(0, 3), ListwiseJudge(gen, n_permutations=2))
    assert lw.num_rows == 1 and sum(lw["scores"][0].as_py()) == pytest.approx(1.0)
    assert validate(lw, "listwise").quarantined.num_rows == 0


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_reward_model_judge(tmp_path, kind):
    import torch
    from transformers import AutoModelForSequenceClassification

    from alignflow.feedback.judges import RewardModelJudge

    tok = tokenizer(kind)
    lm = tiny_lm(tok, hidden_size=32, num_layers=1)
    lm.config.num_labels = 1
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(lm.config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = RewardModelJudge(str(tmp_path / "rm"), device="cpu", batch_size=2)
    r = rm.score(["Reverse: ab", "Reverse: ab", "Copy exactly: c"], ["ba", "ab", "c"])
    assert r.shape == (3,) and np.isfinite(r).all() and r[0] != r[1]
    # batching/padding does not change a score
    assert rm.score(["Reverse: ab"], ["ba"])[0] == pytest.approx(r[0], abs=1e-4)
    p = rm.pairwise_prob(["Reverse: ab"], ["ba"], ["ab"])
    assert p[0] == pytest.approx(1 / (1 + np.exp(-(r[0] - r[1]))), abs=1e-4)


def _hh_pairs(path, n):
    """First n HH-RLHF rows as (prompt transcript, chosen reply, rejected reply), human-labelled."""
    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            d = json.loads(line)
            cut = d["chosen"].rfind("\n\nAssistant:")
            if cut < 0 or d["rejected"][:cut] != d["chosen"][:cut]:
                continue
            rows.append((d["chosen"][:cut].strip()[-200:], d["chosen"][cut + 12:].strip()[:120],
                         d["rejected"][cut + 12:].strip()[:120]))
            if len(rows) == n:
                break
    return rows


def test_agreement_with_human_and_ai_labels_on_real_files(gen, human_labels):
    judge = PairwiseJudge(gen, batch_size=8)
    hh = _hh_pairs(human_labels / "hh-rlhf_harmless-base_test.jsonl.gz", 4)
    res = judge.judge([h[0] for h in hh], [h[1] for h in hh], [h[2] for h in hh])
    a = agreement(res.judge_prob, np.ones(len(hh)))  # humans preferred the first (chosen) side
    assert a["n"] == 4 and 0.0 <= a["agreement"] <= 1.0
    lb = length_bias(res.judge_prob, [len(h[1]) for h in hh], [len(h[2]) for h in hh])
    assert lb["n"] == 4
    # alpaca_eval: GPT-4 judge labels (1 = output_1 better, 2 = output_2, 0 = draw)
    rows = json.loads((human_labels / "alpaca_eval_gpt4_annotations_alpaca-7b.json").read_text())[:4]
    res = judge.judge([r["instruction"][:150] for r in rows], [r["output_1"][:120] for r in rows],
                      [r["output_2"][:120] for r in rows])
    label = np.array([{1: 1.0, 2: 0.0}.get(r["preference"], 0.5) for r in rows])
    a = agreement(res.judge_prob, label)
    assert a["n"] + a["label_ties_skipped"] == 4 and np.isfinite(a["agreement"])
