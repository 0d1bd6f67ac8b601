"""`alignflow online METHOD --prompts DATASET`: every online method on a prompts dataset that is not
the toy task's, through the CLI, with the judge named (a reward model built from the toy world's
checkpoint, or a pairwise LLM judge on it); held-out split, the verifier refused off the toy task,
gold answers required by dno and PPO-ptx."""

from __future__ import annotations

import json

import pytest

TOPICS = ["rain", "the sea", "a cat", "winter", "bread", "a river", "the moon", "tea", "a train", "spring",
          "a lamp", "snow"]
TINY = {  # one small round or step each: these tests show the path runs, not that reward rises
    "rloo": ["steps=1", "prompts_per_step=4", "k=2"],
    "ppo": ["steps=1", "prompts_per_step=4", "samples_per_prompt=2", "ppo_epochs=1"],
    "nash-md": ["steps=1", "prompts_per_step=4"],
    "paft": ["rounds=1", "prompts_per_round=4", "k=2", "epochs=1", "batch_size=4"],
    **{m: ["rounds=1", "prompts_per_round=4", "k=2", "epochs=1", "batch_size=4", "terminate=false"]
       for m in ("iterative-dpo", "self-rewarding", "cringe", "sppo", "dno")},
}


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    """A prompts file of another task (one line about a topic, each with a reference answer), the
    same prompts as a store dataset without references, and a reward model on the toy checkpoint."""
    import torch
    from transformers import AutoTokenizer

    from alignflow.schemas.store import write_dataset
    from alignflow.trainers.reward_model import make_reward_model

    root = tmp_path_factory.mktemp("other-task")
    rows = [{"prompt": f"write one line about {t}", "reference": f"{t} is calm today"} for t in TOPICS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa

    write_dataset(root / "bare", pa.table({"prompt": [r["prompt"] for r in rows]}), "prompts", {"flow": "test"})
    tok = AutoTokenizer.from_pretrained(toy_world.path)
    torch.manual_seed(0)
    rm = make_reward_model(toy_world.path, tok)  # seeded head: a deterministic, if arbitrary, judge
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")

    class World:
        path, file, bare, rm_path = toy_world.path, root / "prompts.jsonl", root / "bare", root / "rm"

    return World


def _online(args: list[str]):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    return CliRunner().invoke(app, ["online", *args])


@pytest.mark.parametrize("method", list(TINY))
def test_every_online_method_runs_on_another_tasks_prompts(world, tmp_path, method):
    out = tmp_path / method
    res = _online([method, "--model", str(world.path), "--prompts", str(world.file), "--num-eval-prompts", "4",
                   "--output", str(out), "--judge", f"reward_model:{world.rm_path}", "--max-new-tokens", "6",
                   *[a for p in TINY[method] for a in ("-p", p)]])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"]["source_rows"] == 12 and report["prompts"]["train_rows"] == 8
    assert report["prompts"]["heldout_rows"] == 4 and report["config"]["judge"]["type"] == "reward_model"
    assert report["generations"] > 0 and report["judge_calls"] > 0 and (out / "model" / "config.json").exists()
    from alignflow.schemas.store import read_dataset

    train = read_dataset(out / "prompts" / "train").column("prompt").to_pylist()
    held = read_dataset(out / "prompts" / "heldout").column("prompt").to_pylist()
    texts = {m[0]["content"] for m in train} | {m[0]["content"] for m in held}
    assert texts == {f"write one line about {t}" for t in TOPICS}  # the dataset's prompts, split, none lost
    assert not {m[0]["content"] for m in train} & {m[0]["content"] for m in held}


def test_pairwise_judge_scores_against_the_reference_and_eval_prompts_dataset(world, tmp_path):
    """A pairwise LLM judge (the toy checkpoint) is the reward: P(sample beats the reference), debiased."""
    out = tmp_path / "pw"
    res = _online(["rloo", "--model", str(world.path), "--prompts", str(world.file), "--eval-prompts",
                   str(world.bare), "--num-eval-prompts", "3", "--output", str(out), "--judge",
                   f"pairwise_llm:{world.path}", "--max-new-tokens", "6", "-p", "steps=1", "-p", "prompts_per_step=4",
                   "-p", "k=2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"]["heldout_rows"] == 3 and report["prompts"]["train_rows"] == 9  # 12 minus the 3 held out
    rewards = report["extra"]["eval_rewards_before"]
    assert len(rewards) == 3 and all(0.0 <= r <= 1.0 for r in rewards)


@pytest.mark.parametrize("args,source,held,message", [
    (["rloo"], "file", 4, "not a toy-task prompt, and judge 'verifier' scores the toy task only"),
    (["dno", "--judge", "RM"], "bare", 4, "dno (its gold responses, eq. 62) needs a 'reference' column"),
    (["ppo", "--judge", "RM", "-p", "ptx_coef=0.1"], "bare", 4, "ppo with ptx_coef > 0 (PPO-ptx's pretraining text) "
                                                                 "needs a 'reference' column"),
    (["rloo", "--judge", "RM"], "file", 12, "12 held out (--num-eval-prompts 12) leave none to train on"),
])
def test_one_line_errors_off_the_toy_task(world, tmp_path, args, source, held, message):
    args = [f"reward_model:{world.rm_path}" if a == "RM" else a for a in args]
    res = _online([*args, "--model", str(world.path), "--prompts", str(getattr(world, source)), "--output",
                   str(tmp_path / "o"), "--num-eval-prompts", str(held)])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()) and "Traceback" not in res.output


def test_online_with_vllm_reloads_the_policy_into_one_engine(world, tmp_path, fake_vllm):  # noqa: F811 (the fixture imported below)
    """--backend vllm (the recording fake of vLLM 0.33): one engine, options passed through, asleep
    while the policy trains, and before sampling with updated weights the policy's checkpoint is
    reloaded into it in place; the cost is in the report."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "vllm"
    res = _online(["rloo", "--model", str(world.path), "--prompts", str(world.file), "--num-eval-prompts", "4",
                   "--output", str(out), "--judge", f"reward_model:{world.rm_path}", "--max-new-tokens", "6",
                   "--backend", "vllm", "-e", "gpu_memory_utilization=0.3", "-e", "max_model_len=256",
                   "-p", "steps=2", "-p", "prompts_per_step=4", "-p", "k=2"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    [engine] = fake_vllm.ENGINES
    assert engine.args["gpu_memory_utilization"] == 0.3 and engine.args["max_model_len"] == 256
    names = [c[0] for c in engine.calls]
    assert names.count("generate") == 4  # eval before, 2 steps, eval after: never on a sleeping engine
    assert names.count("sleep") == 4 and engine.shut_down
    reloads = [c[1]["kwargs"]["weights_path"] for c in engine.calls if c[0] == "collective_rpc"]
    assert set(reloads) <= {str(world.path), str(out / "engine-weights")} and str(out / "engine-weights") in reloads
    assert report["engine"]["weight_pushes"] == 2 and report["engine"]["bytes_per_push"] > 0  # after each update
    pushed, trained = load_file(out / "engine-weights" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert pushed.keys() == trained.keys() and all(torch.equal(pushed[k], trained[k]) for k in pushed)


from tests.test_generation_vllm import fake_vllm  # noqa: E402,F401  (the fixture)


def test_align_flow_takes_a_prompts_file_and_refuses_the_verifier_off_the_toy_task(world, tmp_path):
    """The align flow's prompts: any file convert reads becomes the run's prompts dataset (with its
    references); the toy verifier on those prompts is a one-line error before anything samples."""
    from alignflow.flows.align import run_align
    from alignflow.flows.config import load_config
    from alignflow.flows.tasks import PlainSteps
    from alignflow.schemas.store import read_dataset

    cfg = load_config("align", None, [f"model={world.path}", f"prompts={world.file}", f"output={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="row 0 .* is not a toy-task prompt, and judge 'verifier'"):
        run_align(cfg, PlainSteps(cfg.output))
    source = read_dataset(tmp_path / "run" / "prompts" / "source")
    assert source.num_rows == 12 and source.column("reference").null_count == 0
    assert not (tmp_path / "run" / "iter-0").exists()
