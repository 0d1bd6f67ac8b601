"""Long rows (issue 17, item 2): lengths are cut to the model's context (counted and reported),
forward passes are bounded by padded tokens, not rows, and a batch over the token budget trains
in chunks with the same gradient; ``precompute-ref`` and ``train`` on the longest rows of the
Tulu human-eval sheet stay within 2 GB of resident memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pytest
import torch

from alignflow.trainers.collators import pretokenize, truncated
from alignflow.trainers.logprobs import chunk_by_tokens, padded_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    from alignflow.trainers.toy_model import make_char_tokenizer

    return make_char_tokenizer()


def test_chunks_hold_the_token_budget_and_keep_order():
    prompts = [[1] * n for n in (3, 5, 2, 40, 4, 4)]
    responses = [[[2] * a, [3] * b] for a, b in ((2, 2), (1, 6), (3, 3), (10, 1), (2, 2), (5, 5))]
    for layout in ("packed", "plain"):
        groups = chunk_by_tokens(prompts, responses, layout, max_tokens=24)
        assert [i for g in groups for i in g] == list(range(6))
        for g in groups:
            rows = sum(padded_tokens(len(prompts[i]), [len(r) for r in responses[i]], layout)[0] for i in g)
            width = max(padded_tokens(len(prompts[i]), [len(r) for r in responses[i]], layout)[1] for i in g)
            assert rows * width <= 24 or g == [3]  # example 3 alone is over the budget
    assert chunk_by_tokens(prompts, responses, "packed", None, max_examples=4) == [[0, 1, 2, 3], [4, 5]]


def test_truncation_keeps_prompt_end_and_response_start():
    prompt, responses = list(range(10)), [list(range(100, 108)), list(range(200, 203))]
    assert truncated(prompt, responses, 18) == (prompt, responses)  # fits: the same lists
    p, rs = truncated(prompt, responses, 12)
    assert p == list(range(4, 10)) and rs == [list(range(100, 106)), list(range(200, 203))]
    assert all(len(p) + len(r) <= 12 for r in rs)


def test_pretokenize_marks_cut_rows_and_refuses_mismatched_reference_counts(tok):
    table = pa.table({"prompt": ["short", "a much longer prompt " * 4], "chosen": ["ok", "y" * 50],
                      "rejected": ["no", "n"], "margin": pa.nulls(2, pa.float64()), "source": ["rule"] * 2})
    examples = pretokenize(table, "pairwise", tok, max_length=40)
    assert [e["truncated"] for e in examples] == [False, True]
    assert all(len(e["prompt_ids"]) + len(r) <= 40 for e in examples for r in e["response_ids"])
    counts = [[len(r) for r in e["response_ids"]] for e in examples]
    with_ref = table.append_column("ref_chosen_logps", pa.array([-1.0, -2.0])).append_column(
        "ref_rejected_logps", pa.array([-1.0, -2.0])).append_column(
        "chosen_tokens", pa.array([c[0] for c in counts])).append_column(
        "rejected_tokens", pa.array([c[1] for c in counts]))
    assert pretokenize(with_ref, "pairwise", tok, max_length=40)[1]["ref_logps"] == [-2.0, -2.0]
    with pytest.raises(ValueError, match=r"row 1, field chosen_tokens/rejected_tokens"):
        pretokenize(with_ref, "pairwise", tok)  # not cut: 50+ tokens where the reference saw fewer


@pytest.mark.parametrize("kind,loss", [("pairwise", "dpo"), ("pairwise", "beta_dpo"), ("listwise", "lipo")])
def test_chunked_batch_gives_the_same_loss_and_gradient(tok, tmp_path, kind, loss):
    """A batch split by the token budget (each chunk recomputed in backward) matches the whole
    batch: the loss, and the gradient, also for a loss coupled across the batch (beta-DPO)."""
    from transformers import TrainingArguments

    from alignflow.trainers.preference import PreferenceTrainer
    from alignflow.trainers.toy_model import make_tiny_llama

    g = torch.Generator().manual_seed(0)
    n = 6
    prompts = [f"Copy {i}: " + "x" * int(torch.randint(1, 12, (1,), generator=g)) for i in range(n)]
    if kind == "pairwise":
        table = pa.table({"prompt": prompts, "chosen": [p[-5:] for p in prompts], "rejected": ["zz" * (1 + i) for i in range(n)],
                          "margin": pa.nulls(n, pa.float64()), "source": ["rule"] * n})
    else:
        table = pa.table({"prompt": prompts, "responses": [["a" * (i + 1), "bb", "c" * 9][: 2 + i % 2] for i in range(n)],
                          "scores": [[1.0, 0.5, 0.0][: 2 + i % 2] for i in range(n)]})
    examples = pretokenize(table, kind, tok)
    results = []
    for max_tokens in (None, 60):
        model = make_tiny_llama(tok, hidden_size=32, num_layers=2, seed=0).double()
        args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, disable_tqdm=True,
                                 per_device_train_batch_size=n)
        trainer = PreferenceTrainer(model, args, [dict(e) for e in examples], kind=kind, loss=loss,
                                    processing_class=tok, max_batch_tokens=max_tokens)
        inputs = trainer.data_collator(trainer.train_dataset.examples)
        assert ("seqs_chunks" in inputs) == (max_tokens is not None)
        if max_tokens:
            assert len(inputs["seqs_chunks"]) >= 3
        loss_value = trainer.compute_loss(model, inputs)
        loss_value.backward()
        results.append((loss_value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-8)
    assert results[0][1].abs().max() > 1e-3


def test_token_level_losses_refuse_a_token_budget(tok, tmp_path):
    """Token-level losses read per-token logits of the whole batch (``inputs["seqs"]``): chunking
    their batch would fail mid-run, so ``--max-batch-tokens`` with them is refused up front."""
    from transformers import TrainingArguments

    from alignflow.trainers.preference import PreferenceTrainer
    from alignflow.trainers.toy_model import make_tiny_llama

    table = pa.table({"prompt": ["Copy: ab", "Copy: cd"], "chosen": ["ab", "cd"], "rejected": ["zz", "yy"],
                      "margin": pa.nulls(2, pa.float64()), "source": ["rule"] * 2})
    examples = pretokenize(table, "pairwise", tok)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, disable_tqdm=True)
    model = make_tiny_llama(tok, hidden_size=32, num_layers=1, seed=0)
    with pytest.raises(ValueError, match="--max-batch-tokens runs per-sequence losses in chunks; 'cringe'"):
        PreferenceTrainer(model, args, examples, kind="pairwise", loss="cringe", processing_class=tok,
                          max_batch_tokens=64)


# ---- the 2 GB test on the Tulu sheet -------------------------------------------------------------------

RSS_LIMIT_MB = 2048


def run_within_rss(cmd: list[str], limit_mb: int = RSS_LIMIT_MB, timeout: float = 300) -> tuple[str, float]:
    """Run ``cmd``; kill it as soon as its resident memory passes ``limit_mb`` (the machine is
    shared: a run that would take 20 GB must not get there). Returns (output, peak RSS in MB,
    the kernel's high-water mark of the child)."""
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    deadline = time.monotonic() + timeout
    killed = None
    with tempfile.TemporaryFile("w+") as log:
        # one thread: a tiny model gains nothing from two, and the test should not fight the suite for cores
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{proc.pid}/statm") as fh:
                    rss = int(fh.read().split()[1]) * page_mb
            except (FileNotFoundError, ProcessLookupError, IndexError):
                rss = 0.0
            if killed is None and (rss > limit_mb or time.monotonic() > deadline):
                killed = f"RSS {rss:.0f} MB" if rss > limit_mb else "timeout"
                proc.kill()
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    assert killed is None, f"{' '.join(cmd[3:5])} killed at {killed}:\n{out[-2000:]}"
    assert proc.returncode == 0, out[-3000:]
    return out, usage.ru_maxrss / 1024


@pytest.mark.slow
def test_precompute_and_train_on_long_tulu_rows_within_2gb(human_labels, tmp_path):
    from alignflow.feedback.labels import Options, convert_labels_file
    from alignflow.schemas.store import read_dataset, read_manifest, write_dataset
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama, save_checkpoint

    convert_labels_file(human_labels / "tulu1_human_eval_annotations.xlsx", tmp_path / "tulu", "graded-pairwise",
                        "pairwise", Options())
    table = read_dataset(tmp_path / "tulu")
    chars = [sum(len(m["content"]) for m in p) + len(c) + len(r) for p, c, r in
             zip(table.column("prompt").to_pylist(), table.column("chosen").to_pylist(), table.column("rejected").to_pylist())]
    longest = sorted(range(len(chars)), key=chars.__getitem__)[-48:]
    assert min(chars[i] for i in longest) > 2500  # char-level tokens: 10x the model's 256 positions
    write_dataset(tmp_path / "long", table.take(longest), "pairwise", {"flow": "test"}, overwrite=True)
    tok = make_char_tokenizer()
    save_checkpoint(make_tiny_llama(tok, hidden_size=32, num_layers=1, max_position_embeddings=256, seed=0), tok,
                    tmp_path / "model")

    cli = [sys.executable, "-m", "alignflow.flows.cli"]
    out, peak_pre = run_within_rss(cli + ["precompute-ref", str(tmp_path / "long"), "--model", str(tmp_path / "model"),
                                          "--output", str(tmp_path / "long-ref")])
    assert "48 rows cut to 256 tokens" in out, out
    record = read_manifest(tmp_path / "long-ref")["provenance"]["reference"]
    assert record["max_length"] == 256 and record["truncated_rows"] == 48
    ref = read_dataset(tmp_path / "long-ref")
    assert max(ref.column("chosen_tokens").to_pylist() + ref.column("rejected_tokens").to_pylist()) <= 256

    out, peak_train = run_within_rss(cli + ["train", str(tmp_path / "long-ref"), "--model", str(tmp_path / "model"),
                                            "--output", str(tmp_path / "out"), "--per_device_train_batch_size", "8",
                                            "--max_steps", "2", "--max-batch-tokens", "2048"])
    assert "48 of 48 rows cut to 256 tokens" in out, out
    record = json.loads((tmp_path / "out" / "alignflow_train.json").read_text())
    assert record["truncated_rows"] == 48 and record["max_length"] == 256 and record["train_loss"] > 0
    print(f"peak RSS: precompute-ref {peak_pre:.0f} MB, train {peak_train:.0f} MB")
