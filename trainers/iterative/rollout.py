"""Shared machinery of on-policy methods: encode samples, per-token log-probs, KL, evaluation.

Conventions (all right-padded, one row per (prompt, response)):

- ``TokenBatch.input_ids`` ``[B, T]``: ``prompt | response (+ eos if it finished) | pad``.
- Per-token tensors are indexed by ACTION: column ``t`` of a ``[B, T-1]`` tensor is about token
  ``input_ids[:, t+1]`` predicted from ``input_ids[:, :t+1]``; ``action_mask`` ``[B, T-1]`` is
  True on response tokens only. Responses are contiguous, so "the next action" of a response
  action is column ``t+1`` while ``action_mask[:, t+1]`` holds.

Sampling goes through a ``schemas.generator.Generator`` built by the flow's
``PolicyGeneratorFactory`` around the live policy: trainers never construct backends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from schemas.generator import Generation, Messages, SamplingParams
from schemas.online import OnlineReport


def as_messages(prompt: str | Messages) -> Messages:
    """A plain-text prompt becomes one user turn (the DESIGN's prompt convention)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def prompt_text_of(prompt: Messages) -> str:
    """The last user turn's text (what a programmatic reward like the toy task reads)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def encode_prompt(tokenizer: Any, prompt: Messages) -> list[int]:
    """Token ids of the prompt with the assistant header (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        # text first, then ids without extra specials: the same ids the hf generator samples after
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in prompt) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, response: str, finished: bool = True) -> list[int]:
    """Response ids, plus eos when the sample ended by itself (a truncated sample gets none)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if finished and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class TokenBatch:
    """Right-padded ``prompt | response | pad`` rows; see the module docstring for shapes."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    action_mask: torch.Tensor  # [B, T-1] bool: column t is response token input_ids[:, t+1]

    @property
    def actions(self) -> torch.Tensor:
        return self.input_ids[:, 1:]

    def to(self, device: torch.device | str) -> "TokenBatch":
        """The same batch on ``device`` (no copy when it is already there)."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.action_mask.to(device))


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the device of its first parameter (CPU for a model without
    parameters). Every tensor a trainer builds for a model is put there, so the same code runs
    on CPU and on CUDA."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def colocate(module: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Move ``module`` (a reference policy, a value head) onto ``model``'s device, in place.

    Trainers call it after ``begin_run``: the flow's generator factory moves the live policy to
    its device on first use, and a reference copied before that would stay behind."""
    device = device_of(model)
    return module if device_of(module) == device else module.to(device)


def make_token_batch(prompts_ids: Sequence[Sequence[int]], responses_ids: Sequence[Sequence[int]],
                     pad_id: int) -> TokenBatch:
    """Lay out B (prompt, response) id lists as a right-padded ``TokenBatch``."""
    rows = [list(p) + list(r) for p, r in zip(prompts_ids, responses_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts_ids, responses_ids)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, len(p):n] = True
    return TokenBatch(input_ids, attention_mask, response_mask[:, 1:])


def encode_samples(tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str],
                   finished: Sequence[bool] | None = None) -> TokenBatch:
    """Tokenise aligned prompts and responses into one ``TokenBatch``."""
    finished = finished if finished is not None else [True] * len(responses)
    p_ids = [encode_prompt(tokenizer, p) for p in prompts]
    r_ids = [encode_response(tokenizer, r, f) for r, f in zip(responses, finished)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_token_batch(p_ids, r_ids, pad)


def gather_token_logprobs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[actions]`` in float32: ``[B, T-1, V]``, ``[B, T-1]`` -> ``[B, T-1]``."""
    logits = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits
    return logits.gather(-1, actions[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def forward_token_logprobs(model: torch.nn.Module, batch: TokenBatch,
                           return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-action log-probs ``[B, T-1]`` (zero off the response) and optionally the last hidden
    state at the predicting positions ``[B, T-1, H]`` (what a value head reads); both on the
    model's device (``batch`` is moved there if it is not)."""
    batch = batch.to(device_of(model))
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=return_hidden, use_cache=False)
    logps = gather_token_logprobs(out.logits[:, :-1], batch.actions) * batch.action_mask
    hidden = out.hidden_states[-1][:, :-1] if return_hidden else None
    return logps, hidden


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached, eval-mode copy (the reference policy, or the previous iterate pi^t)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def sequence_kl(policy: torch.nn.Module, ref: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Monte-Carlo KL(pi || pi_ref) per sample, ``sum_t log pi(a_t) - log pi_ref(a_t)``: ``[B]``.

    Unbiased when the responses were sampled from ``policy``."""
    lp, _ = forward_token_logprobs(policy, batch)
    rlp, _ = forward_token_logprobs(ref, batch)
    return (lp - rlp.to(lp.device)).sum(-1)


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` ``[N, W]`` of left-padded sequences (on the
    CPU), so every row's next token is predicted at the last column (incremental decoding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.2x; ``past_key_values``
    is deprecated there) or ``past_key_values`` (older models)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache``, or ``out.past_key_values`` on older models)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Spend:
    """Counters every online method reports: sampled responses and judge/reward calls (items)."""

    generations: int = 0
    judge_calls: int = 0

    def add(self, generations: int = 0, judge_calls: int = 0) -> None:
        self.generations += generations
        self.judge_calls += judge_calls


def sample(generator: Any, prompts: Sequence[Messages], k: int, sampling: SamplingParams,
           spend: Spend | None = None) -> list[list[Generation]]:
    """``k`` samples per prompt from ``generator``; counts them in ``spend``."""
    out = generator.generate(list(prompts), n=k, sampling=sampling)
    if spend is not None:
        spend.add(generations=sum(len(g) for g in out))
    return out


def finished_flags(gens: Sequence[Generation], max_new_tokens: int) -> list[bool]:
    """A sample that used the whole token budget was cut off: it gets no eos when re-encoded."""
    return [g.n_tokens < max_new_tokens for g in gens]


def score(reward_fn: Any, prompts: Sequence[Messages], responses: Sequence[str],
          spend: Spend | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Rewards as a float32 tensor ``[N]`` on ``device`` (default CPU); counts ``N`` judge calls.

    A reward function may return a list, an array or a tensor on any device."""
    if spend is not None:
        spend.add(judge_calls=len(responses))
    rewards = reward_fn(list(prompts), list(responses))
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to(device=device or "cpu", dtype=torch.float32).reshape(-1)
    return torch.as_tensor(list(rewards), dtype=torch.float32, device=device)


def eval_sampling_of(sampling: SamplingParams, seed: int) -> SamplingParams:
    """Evaluation sampling with a FIXED seed: before/after comparisons then use the same random
    numbers (common random numbers), so their difference has far less noise."""
    import dataclasses

    return sampling if sampling.seed is not None else dataclasses.replace(sampling, seed=10_000 + seed)


@torch.no_grad()
def evaluate(make_generator: Any, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Messages],
             reward_fn: Any, sampling: SamplingParams, ref: torch.nn.Module | None = None,
             k: int = 1) -> dict:
    """Mean reward of ``k`` samples per prompt (and mean KL to ``ref`` when given).

    Evaluation spend is not counted in the training budget."""
    was_training = model.training
    model.eval()
    gens = make_generator(model, tokenizer).generate(list(prompts), n=k, sampling=sampling)
    flat_p = [p for p, g in zip(prompts, gens) for _ in g]
    flat_g = [x for g in gens for x in g]
    rewards = score(reward_fn, flat_p, [g.text for g in flat_g])
    out = {"reward": float(rewards.mean()), "rewards": rewards.tolist(), "responses": [g.text for g in flat_g]}
    if ref is not None:
        batch = encode_samples(tokenizer, flat_p, [g.text for g in flat_g],
                               finished_flags(flat_g, sampling.max_new_tokens))
        out["kl"] = float(sequence_kl(model, ref, batch).mean())
    model.train(was_training)
    return out


@dataclass
class RunStart:
    """What every online trainer sets up before its first step (see ``begin_run``)."""

    prompts: list[Messages]
    eval_prompts: list[Messages]
    eval_sampling: SamplingParams
    spend: Spend
    report: OnlineReport  # reward_before filled in
    first: dict  # the starting policy's evaluation (``evaluate``'s output)
    fingerprint: str = ""  # of the config and prompts (``run_fingerprint``); checkpoints carry it
    saved: dict | None = None  # the newest checkpoint of this run (``find_resume``), if any
    meta: dict | None = None


def begin_run(method: str, make_generator: Any, policy: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any],
              eval_prompts: Sequence[Any] | None, eval_reward_fn: Any, sampling: SamplingParams,
              eval_sampling: SamplingParams | None, seed: int, first: dict | None = None) -> RunStart:
    """Normalise the prompts, fix the evaluation sampling and measure the starting policy.

    ``first``: the starting policy's evaluation recorded by an earlier run (a resumed run
    passes its checkpoint's record instead of re-measuring the policy it no longer holds)."""
    prompts = [as_messages(p) for p in prompts]
    eval_prompts = [as_messages(p) for p in (eval_prompts or prompts)]
    eval_sampling = eval_sampling or eval_sampling_of(sampling, seed)
    report = OnlineReport(method=method)
    if first is None:
        first = evaluate(make_generator, policy, tokenizer, eval_prompts, eval_reward_fn, eval_sampling)
    report.reward_before = first["reward"]
    report.extra["eval_rewards_before"] = first["rewards"]
    return RunStart(prompts, eval_prompts, eval_sampling, Spend(), report, first)


def start_run(method: str, cfg: Any, checkpoint_dir: str | Path | None, make_generator: Any, policy: torch.nn.Module,
              tokenizer: Any, prompts: Sequence[Any], eval_prompts: Sequence[Any] | None, eval_reward_fn: Any,
              eval_sampling: SamplingParams | None) -> RunStart:
    """``begin_run`` for a resumable trainer whose config has ``sampling`` and ``seed``: the run's
    fingerprint, its newest checkpoint under ``checkpoint_dir`` (``saved`` / ``meta``, for
    ``resume_into``), and a starting evaluation taken from that checkpoint when there is one."""
    fingerprint = run_fingerprint(cfg, [as_messages(p) for p in prompts])
    saved, meta = find_resume(checkpoint_dir, fingerprint)
    run = begin_run(method, make_generator, policy, tokenizer, prompts, eval_prompts, eval_reward_fn, cfg.sampling,
                    eval_sampling, cfg.seed, first=meta["first"] if meta else None)
    run.fingerprint, run.saved, run.meta = fingerprint, saved, meta
    return run


@dataclass
class OptimConfig:
    """Optimizer settings shared by the online trainers."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    extra: dict = field(default_factory=dict)


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Any, max_grad_norm: float) -> float:
    """Backward, clip, step; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], max_grad_norm)
    optimizer.step()
    return float(norm)


# --------------------------------------------------------------------------------------------
# Checkpoints: a killed run resumes from its newest one (same output folder, same config)
# --------------------------------------------------------------------------------------------
CHECKPOINT_STATE = "state.pt"  # tensors: weights, optimizer states, RNG states
CHECKPOINT_META = "meta.json"  # step/round, fingerprint, history, spend, starting evaluation
# config fields that may differ between a run and its resumption (extending a run is allowed)
RESUMABLE_FIELDS = ("steps", "rounds", "checkpoint_every")


def run_fingerprint(config: Any, prompts: Sequence[Any], ignore: Sequence[str] = RESUMABLE_FIELDS) -> str:
    """Hash of the config (minus ``ignore``) and the training prompts: a checkpoint is resumed
    only by a run that would have produced it."""
    cfg = asdict(config) if is_dataclass(config) else dict(config)
    payload = {"config": {k: v for k, v in cfg.items() if k not in ignore}, "prompts": list(prompts)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state(gen: torch.Generator) -> dict:
    """The global torch RNG (sampling seeds) and the trainer's own generator (prompt order)."""
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(index: int, prefix: str = "step") -> str:
    return f"{prefix}-{index:06d}"


def save_checkpoint(folder: str | Path, name: str, state: dict, meta: dict, keep_weights: int = 1,
                    files: dict[str, str] | None = None) -> Path:
    """Write ``folder/name/{state.pt, meta.json, *files}`` atomically (a temporary folder renamed
    into place, so a kill leaves either the whole checkpoint or none). Older checkpoints keep
    their ``meta.json`` and ``files`` (the record) but lose ``state.pt`` beyond the newest
    ``keep_weights``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / CHECKPOINT_STATE)
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1, default=float))
    for fname, text in (files or {}).items():
        (tmp / fname).write_text(text)
    for f in (tmp / CHECKPOINT_STATE, tmp / CHECKPOINT_META):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = folder / name
    if final.exists():  # the same step saved again (a resumed run that had finished it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    complete = sorted(p for p in folder.iterdir() if p.is_dir() and (p / CHECKPOINT_STATE).exists()
                      and not p.name.startswith("."))
    for old in complete[:-keep_weights] if keep_weights > 0 else []:
        (old / CHECKPOINT_STATE).unlink()
    return final


def latest_checkpoint(folder: str | Path | None) -> Path | None:
    """The newest complete checkpoint under ``folder`` (names sort by step), or None."""
    if folder is None or not Path(folder).is_dir():
        return None
    done = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / CHECKPOINT_STATE).exists() and (p / CHECKPOINT_META).exists())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, fingerprint: str) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint; ValueError when it was written by a different run."""
    path = Path(path)
    meta = json.loads((path / CHECKPOINT_META).read_text())
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path}: checkpoint of a different config or prompts (fingerprint "
                         f"{meta.get('fingerprint')} != {fingerprint}); use another output folder or delete it")
    # on CPU first: a checkpoint written on a GPU node resumes anywhere; load_state_dict copies
    # weights and optimizer moments onto the live parameters' devices
    return torch.load(path / CHECKPOINT_STATE, weights_only=True, map_location="cpu"), meta


def spend_of(meta: dict) -> Spend:
    return Spend(**meta.get("spend", {}))


def find_resume(checkpoint_dir: str | Path | None, fingerprint: str) -> tuple[dict | None, dict | None]:
    """(tensors, meta) of the newest checkpoint of this run under ``checkpoint_dir``, else (None, None)."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None, None
    state, meta = load_checkpoint(path, fingerprint)
    meta["path"] = str(path)
    return state, meta


def checkpoint_meta(index: int, fingerprint: str, report: OnlineReport, spend: Spend, first: dict, **extra) -> dict:
    """What a resumed run needs besides tensors: where it was, its record so far, its spend
    and the starting policy's evaluation (``begin_run``'s ``first``)."""
    return {"index": index, "fingerprint": fingerprint, "history": report.history, "spend": asdict(spend),
            "first": {k: first[k] for k in ("reward", "rewards", "responses") if k in first}, **extra}


def resume_into(run: RunStart, objects: dict[str, Any], gen: torch.Generator) -> tuple[Spend, int]:
    """Load the checkpoint ``start_run`` found into ``objects`` (name -> module or optimizer, the
    names it was saved under), the random streams and ``run.report``; returns (spend, index to
    continue from). Nothing found: (``run.spend``, 0)."""
    if run.saved is None:
        return run.spend, 0
    for name, obj in objects.items():
        obj.load_state_dict(run.saved[name])
    set_rng_state(run.saved["rng"], gen)
    run.report.history = run.meta["history"]
    run.report.extra["resumed_from"] = run.meta["path"]
    return spend_of(run.meta), run.meta["index"]


def save_progress(checkpoint_dir: str | Path | None, done: int, total: int, every: int, objects: dict[str, Any],
                  gen: torch.Generator, fingerprint: str, report: OnlineReport, spend: Spend, first: dict,
                  prefix: str = "step") -> None:
    """Checkpoint ``objects``' states and the random streams after ``done`` of ``total``
    steps (rounds): every ``every`` and at the end; nothing without a ``checkpoint_dir``."""
    if checkpoint_dir is None or (done % max(1, every) and done != total):
        return
    state = {name: obj.state_dict() for name, obj in objects.items()}
    save_checkpoint(checkpoint_dir, checkpoint_name(done, prefix), {**state, "rng": rng_state(gen)},
                    checkpoint_meta(done, fingerprint, report, spend, first))


def finish_run(report: OnlineReport, final: dict | None, spend: Spend, started: float) -> OnlineReport:
    """Fill the report's closing fields: the final ``evaluate`` (reward, KL, per-prompt
    rewards; ``None`` when the run was not evaluated), the spend and the wall time since
    ``started`` (``time.perf_counter``)."""
    if final is not None:
        report.reward_after, report.kl_to_ref = final["reward"], final["kl"]
        report.extra["eval_rewards_after"] = final["rewards"]
    report.generations, report.judge_calls = spend.generations, spend.judge_calls
    report.wall_s = time.perf_counter() - started
    return report
