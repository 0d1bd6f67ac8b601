"""Composition of online methods: builds the generator and the judge from ``feedback`` and hands
them to the trainers of ``trainers`` (which never import ``feedback``).

``run_online(config)`` runs one method end to end on a checkpoint (the toy world's or a real
one) and writes ``OUTPUT/model`` (the trained weights + tokenizer) and ``OUTPUT/report.json``
(reward before/after, KL to the reference, generations and judge calls spent, wall time,
per-round history and, for iterative methods, the termination rule's decision and evidence).
PPO, RLOO, DRO-V, Nash-MD, PAFT and the iterative methods checkpoint into ``OUTPUT/checkpoints`` (every
``checkpoint_every`` steps / every epoch / every finished round): running the same config into the same
output folder again resumes a killed run instead of starting over.

Prompts: the toy task's (the default), or any prompts dataset (``prompts``): a ``prompts``
dataset of the store, or any dataset or file ``alignflow convert`` reads (``prompts_format``,
converted by the same code). Held-out prompts are a seeded split of it, or ``eval_prompts``. The
prompts used go to ``OUTPUT/prompts/{train,heldout}``. DNO's gold answers and PPO-ptx's
pretraining text (prompt + answer) come from the dataset's ``reference`` column (``convert --to
prompts`` fills it from sft responses, pairwise chosen, the best listwise or a desirable binary
response); a method that needs it fails in one line when it is missing.

Generation backends (``backend``): ``hf`` wraps the live policy; ``vllm`` runs one in-process
engine and ``openai`` a vLLM server (``generation.base_url``): before each sampling call whose
policy weights changed, ``EngineSync`` saves them to ``OUTPUT/engine-weights`` and the engine
reloads them in place (``collective_rpc("reload_weights")``); the in-process engine sleeps while
the policy trains. Pushes, seconds and bytes go to ``report.json`` (``engine``).

Rewards come from either source RLAIF (3.2.2) compares: ``reward="direct"`` uses the judge's
score as the reward; ``reward="distilled"`` first trains a BT reward model on the judge's
preferences over on-policy samples and uses that. A pairwise judge scores a response by its
position-debiased probability of beating the prompt's baseline: the ``reference`` answer where
the dataset gives one, else the starting policy's greedy answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from alignflow.schemas.generator import SamplingParams

METHODS = ("reward-model", "preference-model", "ppo", "rloo", "iterative-dpo", "self-rewarding", "cringe",
           "sppo", "nash-md", "dno", "paft", "token-rewards", "dro-v")
HELDOUT_SEED_OFFSET = 7_919  # a dataset's held-out prompts are drawn with another seed than training's


# --------------------------------------------------------------------------------------------
# Adapters: feedback objects -> the schemas.online protocols trainers receive
# --------------------------------------------------------------------------------------------
def policy_generator_factory(device: str | None = "cpu", batch_size: int = 64):
    """``PolicyGeneratorFactory``: the ``hf`` backend over the LIVE policy object."""
    from alignflow.feedback.generation.hf import HFGenerator

    def make(model: Any, tokenizer: Any):
        return HFGenerator(model, tokenizer, device=device, batch_size=batch_size)

    return make


def weights_fingerprint(model: Any) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (torch's version counters
    move on every in-place write: optimizer steps, ``load_state_dict``, merges)."""
    return tuple((id(p), p._version) for p in model.parameters())


class EngineSync:
    """The LIVE policy's weights on a generation engine: an in-process ``VLLMGenerator`` or an
    ``OpenAIGenerator`` talking to a vLLM server (its ``reload_weights``).

    ``generator(model, tokenizer)`` is the ``PolicyGeneratorFactory``: each ``generate`` first
    pushes the policy when its weights changed since the engine last got them (``save_pretrained``
    to ``folder``, then the engine reloads that folder in place), and afterwards lets an
    in-process engine release its memory so training has it. ``stats()`` is the cost.
    """

    def __init__(self, engine: Any, folder: str | Path, policy: Any = None):
        self.engine, self.folder = engine, Path(folder)
        self.current = weights_fingerprint(policy) if policy is not None else None  # the engine's weights
        self.pushes, self.save_s, self.reload_s, self.bytes = 0, 0.0, 0.0, 0

    def push(self, model: Any, tokenizer: Any) -> None:
        mark = weights_fingerprint(model)
        if mark == self.current:
            return
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(self.folder, safe_serialization=True)
        tokenizer.save_pretrained(self.folder)
        saved = time.perf_counter()
        if hasattr(self.engine, "load_weights"):
            self.engine.load_weights(self.folder)
        else:
            self.engine.reload_weights(self.folder)
        self.reload_s += time.perf_counter() - saved
        self.save_s += saved - start
        self.bytes += sum(f.stat().st_size for f in self.folder.glob("*.safetensors"))
        self.pushes += 1
        self.current = mark

    def generator(self, model: Any, tokenizer: Any):
        sync = self

        class SyncedGenerator:
            name = getattr(sync.engine, "name", "engine")

            def generate(self, prompts, n: int = 1, sampling: SamplingParams | None = None):
                sync.push(model, tokenizer)
                try:
                    return sync.engine.generate(prompts, n=n, sampling=sampling)
                finally:
                    if hasattr(sync.engine, "release"):
                        sync.engine.release()

            def score(self, prompt, continuations):
                sync.push(model, tokenizer)
                return sync.engine.score(prompt, continuations)

        return SyncedGenerator()

    def stats(self) -> dict:
        return {"backend": getattr(self.engine, "name", "?"), "weight_pushes": self.pushes,
                "save_s": round(self.save_s, 3), "reload_s": round(self.reload_s, 3),
                "bytes_per_push": self.bytes // self.pushes if self.pushes else 0,
                "how": "policy.save_pretrained(OUTPUT/engine-weights), then collective_rpc('reload_weights', "
                       "weights_path=...) in the running engine (vLLM in process, or a vLLM server's /collective_rpc)"}


class JudgeReward:
    """``RewardFn`` over a pointwise judge (``score(prompts, responses) -> array``)."""

    def __init__(self, judge: Any):
        self.judge = judge

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self.judge.score(list(prompts), list(responses))]


class JudgePreference:
    """``PreferenceFn`` over a pairwise judge (position-debiased: both orders averaged)."""

    def __init__(self, judge: Any):
        self.judge = judge

    def __call__(self, prompts, responses_a, responses_b) -> list[float]:
        return [float(x) for x in self.judge.judge(list(prompts), list(responses_a), list(responses_b)).judge_prob]


class PairwiseReward:
    """``RewardFn`` from a pairwise judge: P(response beats the prompt's baseline), position-debiased
    (the judge scores both orders). ``baselines(prompts) -> list[str]`` gives each prompt's baseline."""

    def __init__(self, judge: Any, baselines: Any):
        self.judge, self.baselines = judge, baselines

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        base = self.baselines(list(prompts))
        return [float(x) for x in self.judge.judge(list(prompts), list(responses), base).judge_prob]


class Baselines:
    """Each prompt's baseline answer: its ``reference`` when known, else the starting checkpoint's
    greedy answer (generated once per prompt, then kept: the baseline never moves in training)."""

    def __init__(self, references: dict[str, str], model_path: str, device: str | None, max_new_tokens: int):
        self.known = dict(references)
        self.model_path, self.device, self.max_new_tokens = model_path, device, max_new_tokens
        self._generator = None

    def __call__(self, prompts: list) -> list[str]:
        from alignflow.trainers.encoding import prompt_text_of

        texts = [prompt_text_of(p) for p in prompts]
        missing = {t: p for t, p in zip(texts, prompts) if t not in self.known}
        if missing:
            if self._generator is None:
                from alignflow.feedback.generation.hf import HFGenerator

                self._generator = HFGenerator(self.model_path, device=self.device)
            greedy = SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens)
            outs = self._generator.generate(list(missing.values()), n=1, sampling=greedy)
            self.known.update({t: o[0].text for t, o in zip(missing, outs)})
        return [self.known[t] for t in texts]


class RewardPreference:
    """``PreferenceFn`` from a pointwise reward through Bradley-Terry: ``sigmoid((r_a - r_b)/scale)``
    (symmetric by construction, so position-debiased)."""

    def __init__(self, reward_fn: Any, scale: float = 0.1):
        self.reward_fn, self.scale = reward_fn, scale

    def __call__(self, prompts, responses_a, responses_b) -> list[float]:
        ra = self.reward_fn(list(prompts), list(responses_a))
        rb = self.reward_fn(list(prompts), list(responses_b))
        return [1.0 / (1.0 + math.exp(-(a - b) / self.scale)) for a, b in zip(ra, rb)]


def self_rewarding_judge_factory(device: str | None = "cpu"):
    """``JudgeFactory`` for self-rewarding (3.5.1): the live model judges with the 5-point rubric."""
    from alignflow.feedback.judges import RubricJudge

    make_gen = policy_generator_factory(device)

    def make(model: Any, tokenizer: Any):
        return JudgeReward(RubricJudge(make_gen(model, tokenizer)))

    return make


def toy_reward(task: Any) -> JudgeReward:
    from alignflow.feedback.judges import FunctionJudge

    return JudgeReward(FunctionJudge.from_task(task))


# --------------------------------------------------------------------------------------------
# Config and the run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OnlineRunConfig:
    method: str
    model: str  # checkpoint folder of the starting policy (SFT)
    output: str
    judge: dict = dataclasses.field(default_factory=lambda: {"type": "verifier"})  # flows.tasks.make_judge spec
    reward: str = "direct"  # or "distilled" (train a BT reward model on the judge first)
    preference: str = "reward"  # nash methods: "reward" (BT of the judge's score), "judge" (pairwise judge), or a preference-model path
    task: dict = dataclasses.field(default_factory=dict)  # toy-task kwargs (prompts + verifier)
    prompts: str | None = None  # prompts dataset, or any dataset/file `alignflow convert` reads (None: the toy task)
    prompts_format: str | None = None  # `convert --from` format of `prompts` (default: its dataset kind, else prompts)
    eval_prompts: str | None = None  # held-out prompts dataset (None: a seeded split of `prompts`)
    num_prompts: int | None = None  # training prompts: toy task 64; a dataset: at most this many (None: all)
    num_eval_prompts: int = 32  # held-out prompts (toy task, or split off `prompts`)
    data: str | None = None  # pairwise/listwise dataset (reward-model, preference-model); binary/scored (dro-v)
    params: dict = dataclasses.field(default_factory=dict)  # method config overrides
    backend: str = "hf"  # policy sampling: hf (the live model), vllm (one in-process engine), openai (a vLLM server)
    generation: dict = dataclasses.field(default_factory=dict)  # base_url, tokenizer (openai); engine: {vllm.LLM options}
    temperature: float = 1.0
    max_new_tokens: int = 24
    device: str = "cpu"
    seed: int = 0
    checkpoints: bool = True  # write OUTPUT/checkpoints and resume from them (all but token-rewards)


@dataclasses.dataclass
class PromptSets:
    """The prompts of a run: training and held-out message lists, gold answers by prompt text."""

    train: list
    heldout: list
    references: dict  # prompt text -> reference answer (toy task: its correct answer)
    info: dict
    pretraining: list | None = None  # PPO-ptx text of the toy task (a dataset's comes from its references)


def _override(obj: Any, params: dict) -> Any:
    known = {f.name for f in dataclasses.fields(obj)}
    bad = sorted(set(params) - known)
    if bad:
        raise ValueError(f"unknown parameter(s) {', '.join(bad)} for {type(obj).__name__}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(obj, **params)


def _samples_to_examples(make_gen, policy, tokenizer, prompts, reward_fn, k: int, sampling) -> list:
    """On-policy listwise data: K samples per prompt scored by the judge (for RM / PM training)."""
    from alignflow.trainers.reward_model import RankedExample

    gens = make_gen(policy, tokenizer).generate(prompts, n=k, sampling=sampling)
    flat_p = [p for p, g in zip(prompts, gens) for _ in g]
    scores = reward_fn(flat_p, [x.text for g in gens for x in g])
    out, pos = [], 0
    for p, g in zip(prompts, gens):
        out.append(RankedExample(p, [x.text for x in g], [float(s) for s in scores[pos:pos + len(g)]]))
        pos += len(g)
    return out


def load_prompt_sets(cfg: OnlineRunConfig, out: Path, task: Any) -> PromptSets:
    """The run's prompts: the toy task's, or a dataset's (see the module doc); written under
    ``OUTPUT/prompts`` for a dataset. Counts add up: train + held-out + unused = the dataset's prompts."""
    from alignflow.trainers import encoding

    if cfg.prompts is None:
        if cfg.eval_prompts is not None:
            raise ValueError("--eval-prompts needs --prompts (the toy task draws its own held-out prompts)")
        n = 64 if cfg.num_prompts is None else cfg.num_prompts
        train = task.prompts(n, seed=cfg.seed)
        held = task.prompts(cfg.num_eval_prompts, seed=cfg.seed + 1000)
        ptx = [f"{p} {task.reference(p)}" for p in task.prompts(256, seed=cfg.seed + 7)]  # other prompts' answers
        return PromptSets([encoding.as_messages(p) for p in train], [encoding.as_messages(p) for p in held],
                          {p: task.reference(p) for p in train + held}, {"source": "toy_task"}, ptx)
    from alignflow.flows.tasks import import_prompts, prepare_prompts
    from alignflow.schemas.store import read_dataset, read_manifest

    folder = out / "prompts"
    spec = {"prompts": cfg.prompts, "prompts_format": cfg.prompts_format, "eval_prompts": cfg.eval_prompts,
            "num_prompts": cfg.num_prompts, "num_eval_prompts": cfg.num_eval_prompts, "seed": cfg.seed}
    spec_file = folder / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) != spec:
        if cfg.checkpoints:
            raise ValueError(f"{folder} holds prompts drawn with another config ({spec_file}); use a new --output "
                             "or --no-resume")
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = import_prompts(str(folder / "source"), source=cfg.prompts, source_format=cfg.prompts_format)
    total = read_manifest(source)["num_rows"]
    if cfg.eval_prompts is not None:
        held_source = import_prompts(str(folder / "heldout-source"), source=cfg.eval_prompts)
        heldout = prepare_prompts(str(folder / "heldout"), n=cfg.num_eval_prompts, seed=cfg.seed + HELDOUT_SEED_OFFSET,
                                  source=held_source)
    else:
        heldout = prepare_prompts(str(folder / "heldout"), n=cfg.num_eval_prompts, seed=cfg.seed + HELDOUT_SEED_OFFSET,
                                  source=source)
    train = prepare_prompts(str(folder / "train"), n=total if cfg.num_prompts is None else cfg.num_prompts,
                            seed=cfg.seed, source=source, exclude=heldout)
    spec_file.write_text(json.dumps(spec))
    tables = {name: read_dataset(path) for name, path in (("train", train), ("heldout", heldout))}
    if tables["train"].num_rows == 0:
        raise ValueError(f"{cfg.prompts}: {total} prompts, {tables['heldout'].num_rows} held out "
                         f"(--num-eval-prompts {cfg.num_eval_prompts}) leave none to train on; lower "
                         "--num-eval-prompts or give --eval-prompts DATASET")
    references = {}
    for table in tables.values():
        if "reference" in table.column_names:
            texts = [encoding.prompt_text_of(p) for p in table.column("prompt").to_pylist()]
            references.update({t: r for t, r in zip(texts, table.column("reference").to_pylist()) if r})
    info = {"source": cfg.prompts, "dataset": source, "train": train, "heldout": heldout,
            "train_rows": tables["train"].num_rows, "heldout_rows": tables["heldout"].num_rows,
            "source_rows": total, "with_reference": len(references)}
    return PromptSets([encoding.as_messages(p) for p in tables["train"].column("prompt").to_pylist()],
                      [encoding.as_messages(p) for p in tables["heldout"].column("prompt").to_pylist()],
                      references, info)


def _require_references(prompt_sets: PromptSets, what: str) -> dict:
    """{prompt text: reference} of every training prompt, or a one-line error saying what is missing."""
    from alignflow.trainers.encoding import prompt_text_of

    texts = [prompt_text_of(p) for p in prompt_sets.train]
    missing = [t for t in texts if t not in prompt_sets.references]
    if missing:
        raise ValueError(f"{what} needs a 'reference' column (a gold answer per prompt) in the prompts dataset "
                         f"{prompt_sets.info.get('source')}: {len(missing)} of {len(texts)} training prompts have "
                         f"none, e.g. {missing[0][:50]!r} (`alignflow convert FILE OUT --from sft|pairwise|... "
                         "--to prompts` keeps the response / chosen answer as reference)")
    return {t: prompt_sets.references[t] for t in texts}


def make_judge_reward(cfg: OnlineRunConfig, prompt_sets: PromptSets) -> Any:
    """The run's ``RewardFn`` from its judge spec (the verifier only on toy-task prompts)."""
    from alignflow.flows.tasks import check_toy_prompts, make_judge

    spec = {**cfg.judge, "task": cfg.judge.get("task", cfg.task)}
    if spec.get("type", "verifier") == "verifier" and not spec.get("verifier") and cfg.prompts is not None:
        for path in (prompt_sets.info["train"], prompt_sets.info["heldout"]):
            check_toy_prompts(path, "verifier")
    if spec.get("type") in ("reward_model",) and cfg.device:
        spec.setdefault("device", cfg.device)
    judge = make_judge(spec)
    if hasattr(judge, "score"):
        return JudgeReward(judge)
    return PairwiseReward(judge, Baselines(prompt_sets.references, cfg.model, cfg.device, cfg.max_new_tokens))


def make_policy_generators(cfg: OnlineRunConfig, policy: Any, out: Path):
    """(``PolicyGeneratorFactory``, ``EngineSync`` or None) for the run's backend."""
    if cfg.backend == "hf":
        return policy_generator_factory(cfg.device), None
    generation = dict(cfg.generation)
    if cfg.backend == "vllm":
        from alignflow.feedback.generation.vllm import VLLMGenerator

        options = dict(generation.get("engine") or {})
        if generation.get("tokenizer"):
            options["tokenizer"] = generation["tokenizer"]
        engine = VLLMGenerator(cfg.model, seed=cfg.seed, **options)
    elif cfg.backend == "openai":
        from alignflow.feedback.generation.openai import OpenAIGenerator

        engine = OpenAIGenerator(generation.get("served_model") or cfg.model, base_url=generation.get("base_url"),
                                 tokenizer=generation.get("tokenizer"))
    else:
        raise ValueError(f"unknown backend {cfg.backend!r}; use hf, vllm or openai")
    sync = EngineSync(engine, out / "engine-weights", policy)
    return sync.generator, sync


def run_online(config: OnlineRunConfig | dict) -> dict:
    """Run one online method; returns the report dict (also written to OUTPUT/report.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.flows.tasks import toy_task

    cfg = config if isinstance(config, OnlineRunConfig) else OnlineRunConfig(**config)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    task = toy_task(cfg.task)
    prompt_sets = load_prompt_sets(cfg, out, task)
    prompts, eval_prompts = prompt_sets.train, prompt_sets.heldout
    judge_reward = make_judge_reward(cfg, prompt_sets)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    policy = AutoModelForCausalLM.from_pretrained(cfg.model).to(cfg.device)  # trainers build on its device
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    make_gen, sync = make_policy_generators(cfg, policy, out)
    report: dict

    if cfg.method in ("reward-model", "preference-model"):
        report = _train_judge_model(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, judge_reward, sampling, out)
    elif cfg.method == "token-rewards":
        report = _token_rewards_demo(cfg, policy, tokenizer, eval_prompts, judge_reward, out)
    else:
        reward_fn = judge_reward
        if cfg.reward == "distilled":
            reward_fn = _distilled_reward(cfg, policy, tokenizer, prompts, make_gen, judge_reward, sampling, out)
        elif cfg.reward != "direct":
            raise ValueError("reward must be 'direct' or 'distilled'")
        preference_fn = _preference(cfg, reward_fn, tokenizer, judge_reward)
        policy, rep = _train_policy(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, reward_fn,
                                    judge_reward, preference_fn, prompt_sets, sampling)
        policy.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        report = rep.to_dict()
    report.update({"method": cfg.method, "config": dataclasses.asdict(cfg), "prompts": prompt_sets.info})
    if sync is not None:
        report["engine"] = sync.stats()
        if hasattr(sync.engine, "close"):
            sync.engine.close()
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _preference(cfg: OnlineRunConfig, reward_fn: Any, tokenizer: Any, judge_reward: Any = None):
    if cfg.method not in ("sppo", "nash-md", "dno"):
        return None
    if cfg.preference == "reward":
        return RewardPreference(reward_fn, scale=float(cfg.params.pop("preference_scale", 0.1)))
    if cfg.preference == "judge":
        if isinstance(judge_reward, PairwiseReward):  # the run's pairwise judge compares the pair itself
            return JudgePreference(judge_reward.judge)
        from alignflow.flows.tasks import make_judge

        if "model" not in cfg.judge:
            raise ValueError("preference=judge needs a pairwise LLM judge: --judge pairwise_llm:PATH")
        return JudgePreference(make_judge({**cfg.judge, "type": "pairwise_llm"}))
    from transformers import AutoModelForSequenceClassification

    from alignflow.trainers.preference_model import PreferenceModelFn

    model = AutoModelForSequenceClassification.from_pretrained(cfg.preference, num_labels=1).to(cfg.device)
    return PreferenceModelFn(model, tokenizer)


def _train_policy(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, reward_fn, eval_reward, preference_fn,
                  prompt_sets, sampling):
    params = dict(cfg.params)
    ckpt = Path(cfg.output) / "checkpoints" if cfg.checkpoints else None
    if cfg.method == "dro-v":
        from alignflow.trainers.online.dro_v import DROVConfig, train_dro_v, trajectories_from_table

        trajectories = None
        if cfg.data:  # offline DRO: scored single responses (binary kind: reward or label column)
            from alignflow.schemas.store import read_dataset

            trajectories = trajectories_from_table(read_dataset(cfg.data))
        policy, _, rep = train_dro_v(policy, tokenizer, _override(DROVConfig(sampling=sampling, seed=cfg.seed), params),
                                     trajectories=trajectories, prompts=prompts, make_generator=make_gen,
                                     reward_fn=reward_fn, eval_prompts=eval_prompts, eval_reward_fn=eval_reward,
                                     checkpoint_dir=ckpt)
    elif cfg.method == "ppo":
        from alignflow.trainers.online.ppo import PPOConfig, train_ppo

        pcfg = _override(PPOConfig(sampling=sampling, seed=cfg.seed), params)
        ptx = None
        if pcfg.ptx_coef > 0:  # "pretraining" text: a prompt followed by its reference answer
            ptx = prompt_sets.pretraining or [f"{text} {answer}" for text, answer in _require_references(
                prompt_sets, "ppo with ptx_coef > 0 (PPO-ptx's pretraining text)").items()]
        policy, _, rep = train_ppo(policy, tokenizer, prompts, make_gen, reward_fn, pcfg, ptx_texts=ptx,
                                   eval_prompts=eval_prompts, eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    elif cfg.method == "rloo":
        from alignflow.trainers.online.rloo import RLOOConfig, train_rloo

        policy, rep = train_rloo(policy, tokenizer, prompts, make_gen, reward_fn,
                                 _override(RLOOConfig(sampling=sampling, seed=cfg.seed), params), eval_prompts=eval_prompts,
                                 eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    elif cfg.method == "nash-md":
        from alignflow.trainers.online.nash_md import NashMDConfig, train_nash_md

        policy, rep = train_nash_md(policy, tokenizer, prompts, make_gen, preference_fn,
                                    _override(NashMDConfig(sampling=sampling, seed=cfg.seed), params),
                                    eval_prompts=eval_prompts, eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    elif cfg.method == "paft":
        from alignflow.trainers.online.paft import PAFTConfig, train_paft

        policy, rep = train_paft(policy, tokenizer, prompts, make_gen, reward_fn,
                                 _override(PAFTConfig(sampling=sampling, seed=cfg.seed), params), eval_prompts=eval_prompts,
                                 eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    else:
        from alignflow.trainers.online.iterative import IterativeConfig, train_iterative

        icfg = _override(IterativeConfig(method=cfg.method, sampling=sampling, seed=cfg.seed), params)
        judge_factory = self_rewarding_judge_factory(cfg.device) if cfg.method == "self-rewarding" else None
        gold = _require_references(prompt_sets, "dno (its gold responses, eq. 62)") if cfg.method == "dno" else None
        policy, rep = train_iterative(policy, tokenizer, prompts, make_gen, icfg, reward_fn=reward_fn,
                                      preference_fn=preference_fn, judge_factory=judge_factory, gold=gold,
                                      eval_prompts=eval_prompts, eval_reward_fn=eval_reward, checkpoint_dir=ckpt)
    rep.extra["reward_source"] = cfg.reward
    return policy, rep


def _distilled_reward(cfg, policy, tokenizer, prompts, make_gen, judge_reward, sampling, out: Path):
    """RLAIF "distilled": a BT reward model trained on the judge's rankings of on-policy samples."""
    from alignflow.feedback.judges import RewardModelJudge
    from alignflow.trainers.reward_model import RewardModelConfig, make_reward_model, train_reward_model

    examples = _samples_to_examples(make_gen, policy, tokenizer, prompts, judge_reward, 4, sampling)
    rm = make_reward_model(cfg.model, tokenizer).to(cfg.device)
    metrics = train_reward_model(rm, tokenizer, examples, examples[-8:], RewardModelConfig(epochs=3, lr=3e-4))
    rm.save_pretrained(out / "reward-model")
    tokenizer.save_pretrained(out / "reward-model")
    (out / "reward-model" / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return JudgeReward(RewardModelJudge(rm, tokenizer, device=cfg.device))


def _train_judge_model(cfg, policy, tokenizer, prompts, eval_prompts, make_gen, judge_reward, sampling, out: Path) -> dict:
    """reward-model / preference-model: on a dataset (``data``) or on judged on-policy samples."""
    from alignflow.trainers.reward_model import (
        RewardModelConfig,
        examples_from_table,
        make_reward_model,
        train_reward_model,
    )

    if cfg.data:
        from alignflow.schemas.store import read_dataset

        examples = examples_from_table(read_dataset(cfg.data))
        cut = max(1, len(examples) // 10)
        train, held = examples[cut:], examples[:cut]
    else:
        k = int(cfg.params.get("k", 4))
        train = _samples_to_examples(make_gen, policy, tokenizer, prompts, judge_reward, k, sampling)
        held = _samples_to_examples(make_gen, policy, tokenizer, eval_prompts, judge_reward, k, sampling)
    params = {k: v for k, v in cfg.params.items() if k != "k"}
    model = make_reward_model(cfg.model, tokenizer).to(cfg.device)
    if cfg.method == "reward-model":
        metrics = train_reward_model(model, tokenizer, train, held, _override(RewardModelConfig(seed=cfg.seed), params))
    else:
        from alignflow.trainers.preference_model import PreferenceModelConfig, train_preference_model

        metrics = train_preference_model(model, tokenizer, train, held, _override(PreferenceModelConfig(seed=cfg.seed), params))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {**metrics, "train_prompts": len(train), "heldout_prompts": len(held)}


def _token_rewards_demo(cfg, policy, tokenizer, eval_prompts, judge_reward, out: Path) -> dict:
    """Beam search with growing beams on held-out prompts: mean judge reward per beam size.
    ``params``: ``ref`` (reference checkpoint; default: the policy itself, i.e. plain likelihood),
    ``beams`` (list), ``beta``, ``objective``."""
    from transformers import AutoModelForCausalLM

    from alignflow.trainers.token_rewards import beam_search_batch

    ref_path = cfg.params.get("ref")
    ref = AutoModelForCausalLM.from_pretrained(ref_path) if ref_path else policy
    beams = cfg.params.get("beams", [1, 2, 4])
    table = {}
    for b in beams:
        texts = [x[0] for x in beam_search_batch(policy, ref, tokenizer, eval_prompts, beam_size=int(b),
                                                 beta=float(cfg.params.get("beta", 0.1)), max_new_tokens=cfg.max_new_tokens,
                                                 objective=cfg.params.get("objective", "q"))]
        table[str(b)] = sum(judge_reward(eval_prompts, texts)) / len(texts)
    return {"reward_by_beam": table}
