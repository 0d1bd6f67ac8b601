"""The preference trainer on a tiny model: log-prob layouts, collators, cached reference columns,
DPO at step 1, KTO's reference point and warning, sDPO stages, and the train / precompute-ref CLI.
Every test runs on both worlds' shapes (char-level Llama; byte-level BPE Qwen2 with ChatML)."""

from __future__ import annotations

import json
import math
import warnings

import pyarrow as pa
import pytest
import torch

from alignflow.trainers.collators import ListwiseCollator, pretokenize
from alignflow.trainers.logprobs import build_sequence_batch, sequence_logps
from alignflow.trainers.losses import compute_loss
from tests.tiny import TOKENIZERS, tiny_lm, tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: one thread is as fast as two and immune to OpenMP spinning on a busy CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=TOKENIZERS)
def tok(request):
    return tokenizer(request.param)


def tiny(tok, dtype=torch.float32, seed=0):
    return tiny_lm(tok, hidden_size=32, num_layers=2, seed=seed).to(dtype)


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_train_epochs=1,
                learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def pair_table(n=8):
    return pa.table({"prompt": [f"Copy exactly: ab{i}" for i in range(n)],
                     "chosen": [f"ab{i}" for i in range(n)], "rejected": ["zz" * (1 + i % 3) for i in range(n)],
                     "margin": pa.nulls(n, pa.float64()), "source": ["rule"] * n})


# ---- log-probs --------------------------------------------------------------------------------------

def _naive_logp(model, prompt, resp):
    ids = torch.tensor([prompt + resp])
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + t, r].detach()) for t, r in enumerate(resp))


def test_packed_equals_plain_equals_naive(tok):
    model = tiny(tok, torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    vocab = len(tok)
    prompts = [torch.randint(7, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]
    responses = [[torch.randint(7, vocab, (n,), generator=g).tolist() for n in ns] for ns in ((4, 7), (2,), (6, 1, 3))]
    packed, t_packed = sequence_logps(model, build_sequence_batch(prompts, responses, 0, "packed"))
    plain, t_plain = sequence_logps(model, build_sequence_batch(prompts, responses, 0, "plain"))
    assert packed.shape == (3, 3)
    assert torch.equal(t_packed, t_plain)
    assert t_packed.tolist() == [[4, 7, 0], [2, 0, 0], [6, 1, 3]]
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-10)
    for b, (p, rs) in enumerate(zip(prompts, responses)):
        for k, r in enumerate(rs):
            assert abs(_naive_logp(model, p, r) - float(packed[b, k])) < 1e-10
        for k in range(len(rs), 3):  # missing responses contribute nothing
            assert float(packed[b, k]) == 0.0


def test_packed_and_plain_gradients_agree(tok):
    grads = {}
    for layout in ("packed", "plain"):
        model = tiny(tok, torch.float64)
        batch = build_sequence_batch([[1, 5, 9, 10], [1, 5, 11]], [[[20, 21, 2], [30, 2]], [[40, 41, 42, 2], [50, 2]]],
                                     0, layout)
        logps, _ = sequence_logps(model, batch)
        (logps[:, 0] - 0.5 * logps[:, 1]).sum().backward()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # Llama's RMSNorm computes in float32 even in a float64 model, so gradients summed at the shared
    # prompt positions round at float32 precision (the forward values above agree to 1e-10)
    torch.testing.assert_close(grads["packed"], grads["plain"], rtol=1e-5, atol=1e-6)
    assert grads["packed"].abs().max() > 1e-2  # a real gradient was compared


# ---- collators -------------------------------------------------------------------------------------

def test_pretokenize_uses_chat_template(tok):
    from alignflow.trainers.encoding import encode_prompt, encode_response

    ex = pretokenize(pair_table(2), "pairwise", tok)[0]
    prompt_text = tok.decode(ex["prompt_ids"], skip_special_tokens=False)
    assert prompt_text in ("<bos><|user|>Copy exactly: ab0<|assistant|>",  # char world
                           "<|im_start|>user\nCopy exactly: ab0<|im_end|>\n<|im_start|>assistant\n")  # ChatML
    # a response is its own tokens then eos, nothing the template writes after the end of turn
    # (ChatML's newline): what a generator samples and the online trainers score
    assert ex["response_ids"][0] == tok("ab0", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["prompt_ids"] == encode_prompt(tok, [{"role": "user", "content": "Copy exactly: ab0"}])
    assert ex["response_ids"][1] == encode_response(tok, "zz")


def test_listwise_collator_masks_variable_k_and_loss_ignores_padding(tok):
    model = tiny(tok, torch.float64).eval()
    table = pa.table({"prompt": ["Reverse: abc", "Reverse: de", "Reverse: fgh"],
                      "responses": [["cba", "abc"], ["ed", "de", "xx"], ["hgf"]],
                      "scores": [[1.0, 0.0], [1.0, 0.2, 0.0], [1.0]]})
    examples = pretokenize(table, "listwise", tok)
    for ex in examples:
        ex["ref_logps"] = [-3.0 - i for i in range(len(ex["response_ids"]))]
    out = ListwiseCollator(tok.pad_token_id)(examples)
    assert out["mask"].tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert out["scores"][0, 2] == 0 and out["ref_logps"][2, 1] == 0
    from alignflow.trainers.logprobs import SequenceBatch

    logps, tokens = sequence_logps(model, SequenceBatch(**out["seqs"]))
    assert tokens[0, 2] == 0 and tokens[2, 1] == 0 and logps[2, 1] == 0
    batch = {"logps": logps, "tokens": tokens, "scores": out["scores"], "mask": out["mask"], "ref_logps": out["ref_logps"]}
    together = compute_loss("list_mle", batch)
    for i, ex in enumerate(examples):  # each example alone (no padding) gives the same loss
        alone = ListwiseCollator(tok.pad_token_id)([ex])
        lp, tk = sequence_logps(model, SequenceBatch(**alone["seqs"]))
        single = compute_loss("list_mle", {"logps": lp, "tokens": tk, "scores": alone["scores"], "mask": alone["mask"],
                                           "ref_logps": alone["ref_logps"]})
        assert abs(float(single[0]) - float(together[i])) < 1e-9


# ---- the trainer -----------------------------------------------------------------------------------

def _first_step_loss(trainer) -> float:
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)))


def test_dpo_step_one_is_ln2_with_policy_as_reference(tok, tmp_path):
    from alignflow.trainers.preference import PreferenceTrainer

    examples = pretokenize(pair_table(), "pairwise", tok)
    trainer = PreferenceTrainer(tiny(tok), args(tmp_path, max_steps=1), examples, kind="pairwise", loss="dpo",
                                processing_class=tok)
    assert abs(_first_step_loss(trainer) - math.log(2)) < 1e-6
    trainer.train()
    first = trainer.state.log_history[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl/implicit"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "lengths/chosen", "lengths/rejected"):
        assert key in first


def test_precomputed_ref_columns_are_used_and_change_the_loss(tok, tmp_path, monkeypatch):
    import alignflow.trainers.precompute as precompute
    from alignflow.trainers.preference import PreferenceTrainer

    model = tiny(tok)
    table = precompute.add_reference_columns(pair_table(), "pairwise", model, tok)
    assert {"ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens"} <= set(table.column_names)

    def no_reference(*a, **k):
        raise AssertionError("the reference must not be recomputed when ref columns are present")

    monkeypatch.setattr(precompute, "fill_reference_logps", no_reference)
    trainer = PreferenceTrainer(model, args(tmp_path), pretokenize(table, "pairwise", tok), kind="pairwise",
                                loss="dpo", loss_params={"beta": 0.5}, processing_class=tok)
    assert abs(_first_step_loss(trainer) - math.log(2)) < 1e-5
    shifted = table.set_column(table.schema.get_field_index("ref_chosen_logps"), "ref_chosen_logps",
                               pa.compute.add(table.column("ref_chosen_logps"), 2.0))
    trainer = PreferenceTrainer(model, args(tmp_path), pretokenize(shifted, "pairwise", tok), kind="pairwise",
                                loss="dpo", loss_params={"beta": 0.5}, processing_class=tok)
    # D = -2 for every pair: loss = -log sigmoid(0.5 * -2)
    assert abs(_first_step_loss(trainer) - (-math.log(1 / (1 + math.exp(1.0))))) < 1e-5


def test_reference_free_loss_needs_no_reference(tok, tmp_path, monkeypatch):
    import alignflow.trainers.precompute as precompute
    from alignflow.trainers.preference import PreferenceTrainer, needs_reference

    assert needs_reference("dpo", "pairwise") and needs_reference("kto", "binary") and needs_reference("lipo", "listwise")
    assert not needs_reference("simpo", "pairwise") and not needs_reference("orpo", "pairwise")
    monkeypatch.setattr(precompute, "fill_reference_logps", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    trainer = PreferenceTrainer(tiny(tok), args(tmp_path, max_steps=2), pretokenize(pair_table(), "pairwise", tok),
                                kind="pairwise", loss="simpo", processing_class=tok)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_wrong_kind_or_token_level_loss_is_refused(tok, tmp_path):
    from alignflow.trainers.preference import PreferenceTrainer

    examples = pretokenize(pair_table(), "pairwise", tok)
    with pytest.raises(ValueError, match="binary"):
        PreferenceTrainer(tiny(tok), args(tmp_path), examples, kind="pairwise", loss="kto", processing_class=tok)
    with pytest.raises(ValueError, match="reward-model scores"):
        PreferenceTrainer(tiny(tok), args(tmp_path), examples, kind="pairwise", loss="bt", processing_class=tok)


def binary_table(n_true, n_false):
    n = n_true + n_false
    return pa.table({"prompt": [f"Reverse: ab{i}" for i in range(n)], "response": [f"{i}ba" for i in range(n)],
                     "label": [True] * n_true + [False] * n_false})


def test_kto_warns_outside_survey_ratio_and_uses_mismatched_pairs(tok, tmp_path):
    from alignflow.trainers.preference import PreferenceTrainer, kto_balance_warning

    assert kto_balance_warning([True] * 5 + [False] * 5, 1.0, 1.0) is None
    assert kto_balance_warning([True] * 6 + [False] * 5, 1.0, 1.0) is None  # 1.2 in [1, 4/3]
    assert "outside [1, 4/3]" in kto_balance_warning([True] * 2 + [False] * 6, 1.0, 1.0)
    examples = pretokenize(binary_table(2, 6), "binary", tok)
    assert examples[0]["kl_response_ids"] == examples[1]["response_ids"][0]  # prompt 0 with response 1
    with pytest.warns(UserWarning, match=r"outside \[1, 4/3\]"):
        trainer = PreferenceTrainer(tiny(tok), args(tmp_path, max_steps=2), examples, kind="binary",
                                    loss="kto", processing_class=tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # balanced data: no warning
        PreferenceTrainer(tiny(tok), args(tmp_path), pretokenize(binary_table(4, 4), "binary", tok), kind="binary",
                          loss="kto", processing_class=tok)
    assert all("ref_kl_logps" in e for e in trainer.train_dataset.examples)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss_batch = trainer.loss_batch(trainer.model, batch)
    assert float(loss_batch["kl"]) == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    trainer.train()
    assert any("kl/kto_ref" in h for h in trainer.state.log_history)


def test_npo_refuses_desirable_rows(tok, tmp_path):
    from alignflow.trainers.preference import PreferenceTrainer

    with pytest.raises(ValueError, match="undesirable"):
        PreferenceTrainer(tiny(tok), args(tmp_path), pretokenize(binary_table(1, 3), "binary", tok), kind="binary",
                          loss="npo", processing_class=tok)


def test_sdpo_each_stage_uses_previous_stage_as_reference(tok, tmp_path):
    from alignflow.trainers.logprobs import build_sequence_batch
    from alignflow.trainers.sdpo import split_chunks, train_sdpo

    assert [len(c) for c in split_chunks(range(10), 3)] == [3, 4, 3]
    examples = pretokenize(pair_table(8), "pairwise", tok)
    model = tiny(tok)
    initial = tiny(tok)
    records = train_sdpo(model, args(tmp_path), examples, stages=2, pad_token_id=tok.pad_token_id)
    assert [r["reference"] for r in records] == ["initial model", "policy after stage 0"]
    second = examples[4:]
    with torch.no_grad():
        b = build_sequence_batch([e["prompt_ids"] for e in second], [e["response_ids"] for e in second], 0)
        by_initial, _ = sequence_logps(initial.eval(), b)
    # stage 1's reference is the stage-0 policy, not the initial model
    assert not torch.allclose(torch.tensor(records[1]["ref_logps"], dtype=torch.float64), by_initial.double(), atol=1e-4)
    assert all(abs(r["log_history"][0]["loss"] - math.log(2)) < 1e-5 for r in records)


# ---- CLI ---------------------------------------------------------------------------------------------

@pytest.fixture
def cli_world(tmp_path, tok):
    from alignflow.schemas.store import write_dataset
    from alignflow.trainers.toy_model import save_checkpoint

    save_checkpoint(tiny(tok), tok, tmp_path / "model")
    write_dataset(tmp_path / "pairs", pair_table(16), "pairwise", {"flow": "test"})
    return tmp_path


def test_cli_precompute_ref_then_train_writes_checkpoint(cli_world, monkeypatch):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app
    from alignflow.schemas.store import read_dataset, read_manifest

    runner = CliRunner()
    res = runner.invoke(app, ["precompute-ref", str(cli_world / "pairs"), "--model", str(cli_world / "model"),
                              "--output", str(cli_world / "pairs_ref"), "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    assert "reference log-probs" in res.output and "16/16" in res.output  # progress: rows done over 4 batches
    ref = read_manifest(cli_world / "pairs_ref")["provenance"]["reference"]
    assert ref["reference_model"] == str(cli_world / "model") and len(ref["weights_sha256"]) == 64
    table = read_dataset(cli_world / "pairs_ref")
    assert table.column("ref_chosen_logps").null_count == 0 and "rejected_tokens" in table.column_names

    import transformers

    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a[0]) or original(*a, **k))
    out = cli_world / "out"
    res = runner.invoke(app, ["train", str(cli_world / "pairs_ref"), "--model", str(cli_world / "model"),
                              "--loss", "dpo", "--param", "beta=0.2", "--output", str(out),
                              "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
                              "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true"])
    assert res.exit_code == 0, res.output
    assert len(loads) == 1  # the policy only: the reference model is never loaded
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    record = json.loads((out / "alignflow_train.json").read_text())
    assert record["reference"]["reference_model"] == str(cli_world / "model")
    assert abs(record["log_history"][0]["loss"] - math.log(2)) < 1e-5
    assert transformers.AutoModelForCausalLM.from_pretrained.__name__  # still patched, checkpoint loads:
    original(str(out))


def test_cli_precompute_ref_counts_both_passes_of_binary_data(cli_world):
    """A binary dataset takes two forward passes (the responses, then KTO's mismatched KL pairs):
    the progress bar counts rows over both, and ends full."""
    from typer.testing import CliRunner

    from alignflow.flows.cli import app
    from alignflow.schemas.store import read_dataset, write_dataset

    write_dataset(cli_world / "binary", binary_table(3, 4), "binary", {"flow": "test"})
    res = CliRunner().invoke(app, ["precompute-ref", str(cli_world / "binary"), "--model", str(cli_world / "model"),
                                   "--output", str(cli_world / "binary_ref"), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "14/14" in res.output, res.output
    assert read_dataset(cli_world / "binary_ref").column("ref_kl_logps").null_count == 0


def test_cli_precompute_ref_bf16_runs_under_autocast(cli_world):
    """--bf16 computes the reference as a bf16 training run computes its policy: other numbers
    than float32 (autocast took effect), equal to bf16 precision, and the manifest says so."""
    from typer.testing import CliRunner

    from alignflow.flows.cli import app
    from alignflow.schemas.store import read_dataset, read_manifest

    logps, records = {}, {}
    for flags in ([], ["--bf16"]):
        out = cli_world / f"ref{'-bf16' * bool(flags)}"
        res = CliRunner().invoke(app, ["precompute-ref", str(cli_world / "pairs"), "--model", str(cli_world / "model"),
                                       "--output", str(out), *flags])
        assert res.exit_code == 0, res.output
        table = read_dataset(out)
        logps[bool(flags)] = torch.tensor(table.column("ref_chosen_logps").to_pylist() +
                                          table.column("ref_rejected_logps").to_pylist(), dtype=torch.float64)
        records[bool(flags)] = read_manifest(out)["provenance"]["reference"]
    assert records[True]["autocast"] == "bfloat16" and records[False]["autocast"] is None
    assert not torch.equal(logps[True], logps[False])
    assert torch.allclose(logps[True], logps[False], rtol=0.02, atol=0.05), (logps[True] - logps[False]).abs().max()


def test_cli_train_bad_input_is_one_line_exit_2(cli_world):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    runner = CliRunner()
    base = ["train", str(cli_world / "pairs"), "--model", str(cli_world / "model"), "--output", str(cli_world / "o")]
    for extra, needle in ((["--loss", "nope"], "unknown loss"), (["--param", "bogus=1"], "no parameter"),
                          (["--loss", "kto"], "binary"), (["--no_such_option", "3"], "no_such_option")):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 2, res.output
        assert needle in res.output


@pytest.mark.gpu
def test_cuda_bf16_packed_matches_plain_and_trains(tok, tmp_path):
    model = tiny(tok).cuda().to(torch.bfloat16)
    batch = build_sequence_batch([[1, 5, 9, 10], [1, 5, 11]], [[[20, 21, 2], [30, 2]], [[40, 41, 42, 2], [50, 2]]], 0)
    packed, _ = sequence_logps(model, batch.to("cuda"))
    plain, _ = sequence_logps(model, build_sequence_batch([[1, 5, 9, 10], [1, 5, 11]],
                                                          [[[20, 21, 2], [30, 2]], [[40, 41, 42, 2], [50, 2]]], 0,
                                                          "plain").to("cuda"))
    assert packed.dtype == torch.float32  # log-softmax in float32 even for a bf16 model
    torch.testing.assert_close(packed, plain, rtol=2e-2, atol=5e-2)
    from transformers import TrainingArguments

    from alignflow.trainers.preference import PreferenceTrainer

    targs = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, bf16=True,
                              report_to=[], save_strategy="no", logging_steps=1, learning_rate=1e-3)
    trainer = PreferenceTrainer(tiny(tok).cuda(), targs, pretokenize(pair_table(), "pairwise", tok), kind="pairwise",
                                loss="dpo", processing_class=tok)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_cli_sdpo_stages(cli_world):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    out = cli_world / "sdpo"
    res = CliRunner().invoke(app, ["train", str(cli_world / "pairs"), "--model", str(cli_world / "model"),
                                   "--sdpo-stages", "2", "--output", str(out), "--per_device_train_batch_size", "4",
                                   "--learning_rate", "1e-3", "--disable_tqdm", "true"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "alignflow_train.json").read_text())
    assert [s["reference"] for s in record["sdpo_stages"]] == ["initial model", "policy after stage 0"]
    assert (out / "model.safetensors").exists()
