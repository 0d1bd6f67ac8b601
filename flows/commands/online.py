"""``alignflow online METHOD`` and ``alignflow token-rewards``: reward models, on-policy RL and
iterative / online alignment (issue 6).

Methods: reward-model, preference-model, ppo, rloo, iterative-dpo, self-rewarding, cringe,
sppo, nash-md, dno, paft, token-rewards, dro-v, on the toy task's prompts or any prompts dataset
(``--prompts``), sampling with hf, vllm or openai (``--backend``), judged by any judge (``--judge``).
Heavy imports stay inside the command bodies.
A second run into the same --output resumes ppo, rloo, the iterative methods, nash-md, paft
and dro-v from their checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from alignflow.flows.commands.common import console, fail, user_errors

METHODS = ("reward-model", "preference-model", "ppo", "rloo", "iterative-dpo", "self-rewarding", "cringe",
           "sppo", "nash-md", "dno", "paft", "token-rewards", "dro-v")


def _params(items: List[str], option: str = "--param") -> dict:
    out = {}
    for text in items:
        if "=" not in text:
            fail(f"{option} {text!r}: expected key=value")
        key, value = text.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _judge_spec(text: str) -> dict:
    """``verifier`` | ``reward_model:PATH`` | ``pairwise_llm:PATH`` | ``rubric:PATH``."""
    kind, _, path = text.partition(":")
    if kind not in ("verifier", "reward_model", "pairwise_llm", "rubric"):
        fail(f"--judge {text!r}: expected verifier, reward_model:PATH, pairwise_llm:PATH or rubric:PATH")
    if kind != "verifier" and not path:
        fail(f"--judge {kind} needs a model path: {kind}:PATH")
    if path and not Path(path).exists():
        fail(f"--judge {kind}:{path}: checkpoint not found")
    return {"type": kind, **({"model": path} if path else {})}


def register(app: typer.Typer) -> None:
    @app.command("online")
    def online(
        method: str = typer.Argument(..., help=f"one of: {', '.join(METHODS)}"),
        model: Path = typer.Option(..., "--model", "-m", help="starting policy checkpoint (e.g. the toy world's SFT model)"),
        output: Path = typer.Option(..., "--output", "-o", help="run folder: model/, prompts/ and report.json"),
        judge: str = typer.Option("verifier", help="verifier (toy-task prompts only) | reward_model:PATH | "
                                  "pairwise_llm:PATH | rubric:PATH"),
        reward: str = typer.Option("direct", help="direct (judge score is the reward) or distilled (train a BT RM first)"),
        preference: str = typer.Option("reward", help="nash methods: reward | judge | PATH of a preference model"),
        data: Optional[Path] = typer.Option(None, help="pairwise/listwise dataset (reward-model, preference-model); "
                                            "binary dataset with a reward or label column (dro-v, offline)"),
        prompts: Optional[Path] = typer.Option(
            None, help="prompts: a prompts dataset, or any dataset or file `alignflow convert` reads (see "
                       "--prompts-format); its 'reference' column holds gold answers (dno; ppo with ptx_coef). "
                       "Default: the toy task's prompts"),
        prompts_format: Optional[str] = typer.Option(None, help="format of --prompts as `alignflow convert --from` "
                                                     "names it (default: the dataset's kind, else prompts)"),
        eval_prompts: Optional[Path] = typer.Option(None, help="held-out prompts dataset (default: a seeded split of "
                                                    "--prompts)"),
        num_prompts: Optional[int] = typer.Option(None, min=1, help="training prompts: how many toy prompts (default 64), "
                                                  "or at most this many of --prompts (default: all left after the "
                                                  "held-out split). Was --prompts N before --prompts took a dataset"),
        num_eval_prompts: int = typer.Option(32, min=1, help="held-out prompts (toy task, or split off --prompts)"),
        backend: str = typer.Option("hf", help="policy sampling: hf (the live model), vllm (one in-process engine; the "
                                    "policy's weights are reloaded into it before each sampling step), openai (a vLLM "
                                    "server at --base-url started with VLLM_SERVER_DEV_MODE=1, reading OUTPUT)"),
        base_url: Optional[str] = typer.Option(None, help="openai: server URL, e.g. http://127.0.0.1:8000/v1"),
        tokenizer: Optional[str] = typer.Option(None, help="openai: the served model's tokenizer (multi-token scoring); "
                                                "vllm: a tokenizer other than the checkpoint's"),
        engine_option: List[str] = typer.Option([], "--engine-option", "-e", help="vllm.LLM option key=value "
                                                "(repeatable): gpu_memory_utilization, tensor_parallel_size, "
                                                "max_model_len, dtype, enable_prefix_caching, ..."),
        param: List[str] = typer.Option([], "--param", "-p", help="method config override key=value (repeatable)"),
        max_new_tokens: int = typer.Option(24, min=1, help="longest sampled response, in tokens"),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu"),
        resume: bool = typer.Option(True, help="checkpoint into OUTPUT/checkpoints and resume from them"),
    ) -> None:
        """Train with an online / RL method and write the run report (reward gain, KL, spend)."""
        if method not in METHODS:
            fail(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        if backend not in ("hf", "vllm", "openai"):
            fail(f"--backend must be hf, vllm or openai, not {backend!r}")
        if not model.exists():
            fail(f"{model}: model checkpoint not found")
        for name, path in (("--data", data), ("--prompts", prompts), ("--eval-prompts", eval_prompts)):
            if path is not None and not path.exists():
                fail(f"{path}: {name} not found")
        with user_errors(ImportError):
            from alignflow.flows.online import OnlineRunConfig, run_online

            generation = {k: v for k, v in {"base_url": base_url, "tokenizer": tokenizer,
                                            "engine": _params(engine_option, "--engine-option")}.items() if v}
            cfg = OnlineRunConfig(method=method, model=str(model), output=str(output), judge=_judge_spec(judge),
                                  reward=reward, preference=preference, data=str(data) if data else None,
                                  prompts=str(prompts) if prompts else None, prompts_format=prompts_format,
                                  eval_prompts=str(eval_prompts) if eval_prompts else None, num_prompts=num_prompts,
                                  num_eval_prompts=num_eval_prompts, backend=backend, generation=generation,
                                  params=_params(param), max_new_tokens=max_new_tokens, seed=seed, device=device,
                                  checkpoints=resume)
            report = run_online(cfg)
        shown = {k: report[k] for k in ("reward_before", "reward_after", "reward_gain", "kl_to_ref", "generations",
                                        "judge_calls", "wall_s", "eval_accuracy", "eval_accuracy_before",
                                        "reward_by_beam", "termination", "engine") if k in report}
        info = report.get("prompts", {})
        if "train_rows" in info:
            shown["prompts"] = {k: info[k] for k in ("source_rows", "train_rows", "heldout_rows", "with_reference")}
        console.print_json(json.dumps(shown, default=float))
        console.print(f"report: {output / 'report.json'}")

    @app.command("token-rewards")
    def token_rewards_cmd(
        policy: Path = typer.Option(..., help="the DPO-trained policy checkpoint"),
        ref: Path = typer.Option(..., help="its reference checkpoint"),
        prompt: str = typer.Option(..., help="the prompt (one user turn)"),
        response: Optional[str] = typer.Option(None, help="a response to explain token by token"),
        beam: int = typer.Option(0, help="> 0: generate with reward-guided beam search of this size instead"),
        beta: float = typer.Option(0.1),
        objective: str = typer.Option("q", help="beam ranking: q (beta*log pi) or reward (beta*log pi/pi_ref)"),
        max_new_tokens: int = typer.Option(24),
    ) -> None:
        """Per-token implicit rewards beta*log(pi/pi_ref) of a response (where it went wrong),
        or a reward-guided beam search (survey 3.4.1)."""
        for p in (policy, ref):
            if not p.exists():
                fail(f"{p}: checkpoint not found")
        if response is None and beam <= 0:
            fail("give --response to explain, or --beam N to generate")
        with user_errors():
            from rich.table import Table
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from alignflow.trainers.token_rewards import beam_search, token_rewards

            tok = AutoTokenizer.from_pretrained(str(policy))
            pol = AutoModelForCausalLM.from_pretrained(str(policy)).eval()
            rf = AutoModelForCausalLM.from_pretrained(str(ref)).eval()
            if beam > 0:
                text, score = beam_search(pol, rf, tok, prompt, beam_size=beam, beta=beta,
                                          max_new_tokens=max_new_tokens, objective=objective)
                console.print_json(json.dumps({"response": text, "score": score, "beam": beam}))
                response = text
            rows = token_rewards(pol, rf, tok, prompt, response, beta=beta)
            table = Table("token", "reward", "log pi", "log pi_ref")
            worst = min(range(len(rows)), key=lambda i: rows[i].reward) if rows else -1
            for i, r in enumerate(rows):
                style = "bold red" if i == worst else None
                table.add_row(repr(r.token), f"{r.reward:+.4f}", f"{r.logp:.3f}", f"{r.ref_logp:.3f}", style=style)
            console.print(table)
            console.print(f"total implicit reward: {sum(r.reward for r in rows):+.4f}; lowest at token {worst}")
