"""Every verb and every method of the CLI on the embedded worlds (the toy world's char-level
Llama and the BPE world's byte-level BPE Qwen2 with ChatML): generate, judge (pairwise LLM,
rubric, listwise, reward model, verifier), critique, rejection-sample, convert, precompute-ref,
train with every loss ``alignflow train`` accepts, token-rewards and every ``alignflow online``
method. Budgets are tiny: these check that each runs end to end and writes what it should on a
real-shaped checkpoint; the reward-rises tests (test_trainer_toy.py, test_online.py) check
that training helps.

Cost (CI budget): on the BPE world every loss and every online method; on the toy world, whose
online methods the reward-rises tests already run (test_online.py, test_online_cringe.py,
test_dro_v.py, test_reward_model.py), the feedback verbs and one loss per data path
(``TOY_LOSSES``: what depends on the world is the tokenization of each kind, not the loss)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from alignflow.flows.cli import app
from alignflow.schemas.store import read_dataset, read_manifest, write_dataset


def cli(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"alignflow {' '.join(map(str, args))}\n{res.output}"
    return res.output


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: as fast, and immune to a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chains(toy_world, bpe_world, tmp_path_factory, one_thread):
    """``chain(name)``: the feedback verbs run once per module on the named world."""
    worlds, built = {"toy": toy_world, "bpe": bpe_world}, {}

    def chain(name: str):
        if name not in built:
            built[name] = _feedback_chain(worlds[name], tmp_path_factory.mktemp("verbs"))
        return built[name]

    return chain


def _feedback_chain(world, root):
    """prompts -> samples -> every judge, rejection sampling, convert, critique, precompute-ref;
    returns (world, folder) with every dataset the later tests train on."""
    model = str(world.path)
    write_dataset(root / "prompts", pa.table({"prompt": world.task.prompts(6, seed=5)}), "prompts", {"flow": "test"})
    cli("generate", root / "prompts", root / "samples", "--model", model, "-k", "4", "--max-new-tokens", "24",
        "--seed", "1")
    samples = read_dataset(root / "samples")
    assert samples.num_rows == 24 and min(samples.column("n_tokens").to_pylist()) >= 1
    from transformers import AutoTokenizer

    specials = AutoTokenizer.from_pretrained(model).all_special_tokens
    assert not any(s in text for text in samples.column("response").to_pylist() for s in specials)
    # judges: pairwise LLM (the SFT model judges), rubric, listwise, reward model, verifier
    cli("judge", root / "samples", root / "pairs-llm", "--model", model, "--tie-band", "0", "--pairs-per-prompt", "2")
    assert read_manifest(root / "pairs-llm")["provenance"]["judge"]["judge"] == "pairwise-llm"
    cli("judge", root / "pairs-llm", root / "pairs-checked", "--model", model)
    cli("judge", root / "samples", root / "rubric", "--judge", "rubric", "--model", model)
    rubric = read_dataset(root / "rubric").column("reward").to_pylist()
    assert all(0 <= r <= 5 for r in rubric)
    cli("judge", root / "samples", root / "ranked", "--judge", "listwise", "--model", model, "--permutations", "2")
    assert read_manifest(root / "ranked")["kind"] == "listwise"
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(root / "rm")
    AutoTokenizer.from_pretrained(model).save_pretrained(root / "rm")
    cli("judge", root / "samples", root / "rm-scored", "--judge", "reward-model", "--model", root / "rm")
    cli("judge", root / "samples", root / "scored", "--judge", "toy-task")
    # rejection sampling on the verifier's rewards, and a binary dataset by convert
    cli("rejection-sample", root / "scored", root / "pairwise", "--method", "best-vs-worst")
    cli("rejection-sample", root / "scored", root / "listwise", "--method", "listwise")
    cli("rejection-sample", root / "scored", root / "best", "--method", "best-of-n")
    cli("rejection-sample", root / "samples", root / "rso", "--method", "rso", "--judge", "toy-task", "--m", "2")
    cli("convert", root / "listwise", root / "binary", "--from", "listwise", "--to", "binary")
    table = read_dataset(root / "binary")
    write_dataset(root / "negative", table.filter(pa.compute.invert(table.column("label"))), "binary", {"flow": "test"})
    cli("critique", root / "best", root / "cai", "--model", model, "--max-new-tokens", "8")
    assert read_manifest(root / "cai" / "sft")["num_rows"] + read_manifest(root / "cai" / "critiques")["num_rows"] > 0
    for kind in ("pairwise", "listwise", "binary", "negative"):
        cli("precompute-ref", root / kind, "--model", model, "--output", root / f"{kind}-ref")
    return world, root


@pytest.mark.parametrize("name", ["toy", "bpe"])
def test_feedback_verbs_write_their_kinds(chains, name):
    _, root = chains(name)
    kinds = {name: read_manifest(root / name)["kind"] for name in
             ("samples", "pairs-llm", "rubric", "ranked", "rm-scored", "pairwise", "listwise", "best", "rso", "binary")}
    assert kinds == {"samples": "samples", "pairs-llm": "pairwise", "rubric": "samples", "ranked": "listwise",
                     "rm-scored": "samples", "pairwise": "pairwise", "listwise": "listwise", "best": "sft",
                     "rso": "pairwise", "binary": "binary"}
    ref = read_dataset(root / "pairwise-ref")
    assert ref.column("ref_chosen_logps").null_count == 0
    assert min(ref.column("chosen_tokens").to_pylist()) >= 2  # response tokens + eos


def _trainable_losses():
    """(loss, dataset) for every loss of LOSSES that ``alignflow train`` accepts."""
    from alignflow.trainers.losses import LOSSES
    from alignflow.trainers.preference import NEEDS_MORE_THAN_SUMMARIES, loss_kind

    cases = []
    for loss in sorted(LOSSES):
        if loss == "dro":  # its own trainer, on binary data
            cases.append((loss, "binary-ref"))
            continue
        if loss in NEEDS_MORE_THAN_SUMMARIES:
            continue
        for kind in ("pairwise", "listwise", "binary"):
            try:
                loss_kind(loss, kind)
            except ValueError:
                continue
            cases.append((loss, "negative-ref" if loss == "npo" else f"{kind}-ref"))
            break
    return cases


TOY_LOSSES = ("dpo", "simpo", "lipo", "kto", "npo", "dro")  # pairwise (+ reference-free), listwise, binary, DRO-V
TRAIN_CASES = [("bpe", *case) for case in _trainable_losses()] + \
    [("toy", *case) for case in _trainable_losses() if case[0] in TOY_LOSSES]


@pytest.mark.parametrize("name,loss,dataset", TRAIN_CASES, ids=["-".join(c) for c in TRAIN_CASES])
def test_train_every_loss(chains, name, loss, dataset, tmp_path):
    world, root = chains(name)
    out = tmp_path / "model"
    samples = ("--samples", root / "samples") if loss == "nn" else ()  # eq. 53's K samples of the reference
    cli("train", root / dataset, "--model", world.path, "--loss", loss, "--output", out, *samples, "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-4", "--disable_tqdm", "true",
        "--save_strategy", "no", "--report_to", "none")
    import torch
    from safetensors.torch import load_file

    start, trained = load_file(world.path / "model.safetensors"), load_file(out / "model.safetensors")
    record = json.loads((out / "alignflow_train.json").read_text())
    losses = [h["loss"] for h in record["log_history"] if "loss" in h] + [record.get("train_loss", 1.0)]
    assert record["loss"] == loss and all(math.isfinite(x) for x in losses)
    stepped = any(not torch.equal(start[k], trained[k]) for k in start)
    # SLiC's hinge is satisfied by pairs whose log-prob gap exceeds delta: no gradient, no step
    assert start.keys() == trained.keys() and (stepped or record.get("train_loss") == 0.0)


def test_token_rewards_verb(world, one_thread):
    from transformers import AutoTokenizer

    prompt = world.task.prompts(1, seed=3)[0]
    answer = world.task.reference(prompt)
    out = cli("token-rewards", "--policy", world.path, "--ref", world.path, "--prompt", prompt, "--response", answer)
    assert "total implicit reward: +0.0000" in out  # policy == reference: every token's reward is 0
    n_tokens = len(AutoTokenizer.from_pretrained(world.path)(answer, add_special_tokens=False)["input_ids"])
    assert out.count("+0.0000") == n_tokens + 1 + 1  # each token, eos, and the total
    assert "total" in cli("token-rewards", "--policy", world.path, "--ref", world.path, "--prompt", prompt, "--beam",
                          "2", "--max-new-tokens", "12")


ONLINE = {  # method: tiny budget
    "reward-model": {"k": 2, "epochs": 1},
    "preference-model": {"k": 2, "epochs": 1},
    "ppo": {"steps": 1, "prompts_per_step": 2, "samples_per_prompt": 2},
    "rloo": {"steps": 1, "prompts_per_step": 2, "k": 2},
    "iterative-dpo": {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1, "terminate": False},
    "self-rewarding": {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1, "terminate": False},
    "cringe": {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1, "terminate": False},
    "sppo": {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1, "terminate": False},
    "dno": {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1, "terminate": False},
    "nash-md": {"steps": 1, "prompts_per_step": 2},
    "paft": {"rounds": 1, "prompts_per_round": 4, "k": 2, "epochs": 1},
    "token-rewards": {"beams": [1, 2]},
    "dro-v": {"prompts_per_round": 4, "k": 2, "epochs": 1},
}


def test_online_methods_are_all_covered():
    from alignflow.flows.commands.online import METHODS

    assert set(ONLINE) == set(METHODS)


@pytest.mark.parametrize("method", list(ONLINE))
def test_online_every_method(bpe_world, method, tmp_path, one_thread):
    world = bpe_world
    out = tmp_path / "run"
    params = [x for key, value in ONLINE[method].items() for x in ("--param", f"{key}={json.dumps(value)}")]
    cli("online", method, "--model", world.path, "--output", out, "--num-prompts", "8", "--num-eval-prompts", "2", *params)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method
    if method == "token-rewards":
        assert set(report["reward_by_beam"]) == {"1", "2"}
    elif method in ("reward-model", "preference-model"):
        assert (out / "model" / "config.json").exists()
    else:
        assert math.isfinite(report["reward_before"]) and math.isfinite(report["reward_after"])
        assert report["generations"] > 0 and (out / "model" / "config.json").exists()
