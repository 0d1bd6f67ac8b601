"""Run configurations: one YAML file per run, validated with pydantic.

Every field carries a description (``alignflow run FLOW --config FILE --show-config`` prints
them). Overrides from the command line use dotted keys whose values are parsed as YAML::

    alignflow run align --config flows/configs/demo.yaml --set iterations=3 --set train.params.beta=0.2

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BACKENDS = ("hf", "vllm", "openai")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationConfig(_Strict):
    """How responses are sampled (the K samples per prompt of each iteration)."""

    backend: str = Field(
        "hf", description="Generation backend: hf (transformers, CPU/GPU), vllm (in-process engine, GPU), "
                          "openai (any OpenAI-compatible server at base_url), or 'module:factory' for your own "
                          "(factory(model, **options) returns a schemas.generator.Generator).")
    k: int = Field(4, ge=1, description="Samples per prompt.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(48, ge=1, description="Longest response, in tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per backend call.")
    shard_size: int = Field(32, ge=1, description="Prompts per generation/judging shard (one Prefect task, "
                                                  "one unit of resume).")
    base_url: str | None = Field(None, description="Server URL for backend=openai (the API key is read from "
                                                   "OPENAI_API_KEY, never from this file).")
    tokenizer: str | None = Field(None, description="openai: the served model's tokenizer (name or folder), for "
                                                    "multi-token log-prob scoring (the KL to the start); vllm: a "
                                                    "tokenizer other than the checkpoint's.")
    engine: dict[str, Any] = Field(default_factory=dict, description="vllm: vllm.LLM engine options, e.g. "
                                   "{gpu_memory_utilization: 0.4, tensor_parallel_size: 2, max_model_len: 4096, "
                                   "dtype: bfloat16, enable_prefix_caching: true}. One engine per process: it sleeps "
                                   "(enable_sleep_mode, default true) while the policy trains.")
    device: str | None = Field(None, description="Device for the hf backend (None = cuda if available, else cpu).")
    retries: int = Field(3, ge=0, description="Retries of a shard after a transient backend error.")
    retry_delays: list[float] = Field([1.0, 4.0, 16.0], description="Seconds to wait before each retry "
                                                                    "(exponential backoff).")


    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value in BACKENDS or ":" in value:
            return value
        from alignflow.flows.tasks import BACKEND_FACTORIES  # backends registered in this process

        if value in BACKEND_FACTORIES:
            return value
        raise ValueError(f"unknown backend {value!r}; use one of {', '.join(BACKENDS)} or 'module:factory'")


class FeedbackConfig(_Strict):
    """Who labels the samples and what dataset kind comes out."""

    judge: Literal["verifier", "pairwise_llm", "rubric", "reward_model"] = Field(
        "verifier", description="verifier: the task's programmatic reward as a function judge; pairwise_llm: "
                                "position-debiased LLM judge (judge_model); rubric: 5-point additive rubric; "
                                "reward_model: a sequence-classification checkpoint (judge_model).")
    judge_model: str | None = Field(None, description="Checkpoint of the LLM judge or reward model "
                                                      "(None = the policy's starting checkpoint).")
    kind: Literal["pairwise", "listwise", "binary"] = Field(
        "pairwise", description="pairwise: best vs worst of the K samples; listwise: all K with their scores; "
                                "binary: each sample labelled good when its score beats the prompt's mean.")
    min_margin: float = Field(0.0, ge=0, description="Pairwise: drop pairs whose score gap is not above this.")


class ConstitutionalConfig(_Strict):
    """Optional Constitutional AI SFT stage before the first iteration (survey 3.2.1)."""

    enabled: bool = Field(False, description="Run critique-revision and SFT on the revisions first.")
    constitution: str | None = Field(None, description="Constitution YAML (None = the built-in one).")
    rounds: int = Field(1, ge=1, description="Critique-revision rounds per response.")
    epochs: float = Field(1.0, gt=0, description="SFT epochs over the revisions.")


class TrainConfig(_Strict):
    """Training with the chosen loss of the loss table (trainers.losses)."""

    loss: str = Field("dpo", description="Loss name (trainers.losses.LOSSES), e.g. dpo, ipo, simpo, kto, lipo.")
    params: dict[str, Any] = Field(default_factory=lambda: {"beta": 0.1},
                                   description="Loss parameters, e.g. {beta: 0.1}.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0, description="Epochs over each iteration's dataset.")
    batch_size: int = Field(16, ge=1, description="Per-device batch size (global = this x processes x "
                                                 "gradient_accumulation_steps).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = run the epochs).")
    num_processes: int = Field(1, ge=1, description="Processes; above 1 the train task launches "
                                                    "`accelerate launch` (DDP; gloo on CPU).")
    accelerate_config: str | None = Field(None, description="accelerate config file passed through "
                                                            "(DeepSpeed or FSDP settings).")
    reference: Literal["previous", "initial"] = Field(
        "previous", description="Reference model of iteration t: previous = the policy that produced the "
                                "samples (iterative DPO refresh), initial = the starting checkpoint.")
    seed: int = Field(0, description="Training seed.")


class EvalConfig(_Strict):
    """Held-out evaluation after each iteration: mean reward and KL to the starting policy."""

    n_prompts: int = Field(64, ge=1, description="Held-out prompts (never trained on).")
    k: int = Field(2, ge=1, description="Samples per held-out prompt.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of evaluation.")


class TerminationConfig(_Strict):
    """When iterating stops before ``iterations`` (survey 4.6 calls the rule open).

    The evidence (held-out win-rate of iteration t over t-1 with its one-sided binomial test,
    and the reward gain) is computed and written into report.json whatever the rule.
    """

    rule: Literal["winrate", "reward", "none"] = Field(
        "winrate", description="winrate: stop when the held-out win-rate of t over t-1 (per prompt, by the judge's "
                               "reward) is not significantly above 1/2 or the reward stopped rising "
                               "(trainers.online.termination); reward: only the reward rule; none: run all.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Level of the one-sided binomial test.")
    min_gain: float = Field(0.0, description="Smallest held-out reward gain that counts as rising.")
    tie_band: float = Field(1e-9, ge=0, description="Per-prompt reward differences within this are ties.")


class AlignConfig(_Strict):
    """``align_from_prompts``: prompts -> samples -> AI feedback -> dataset -> training, repeated."""

    name: str = Field("align", description="Run name (the run folder is <output>/<name>-<time> unless "
                                           "output names a folder).")
    output: str | None = Field(None, description="Run folder. Rerunning with the same folder resumes: "
                                                 "finished steps and shards are skipped.")
    seed: int = Field(0, description="Seed of prompt sampling, generation and training.")
    model: str | None = Field(None, description="Starting policy checkpoint (None = build the embedded `world` "
                                                "and use its SFT model).")
    world: Literal["toy", "bpe"] = Field(
        "toy", description="Embedded world built when model is None: toy (char-level tokenizer, tiny Llama) or "
                           "bpe (byte-level BPE with a ChatML template, tiny Qwen2 with grouped-query attention); "
                           "both fit the toy task.")
    prompts: str | None = Field(None, description="Prompts: a prompts dataset, or any dataset or file `alignflow "
                                                  "convert` reads (None = the toy task's prompts).")
    prompts_format: str | None = Field(None, description="`alignflow convert --from` format of prompts (None = the "
                                                         "dataset's kind, else prompts).")
    eval_prompts: str | None = Field(None, description="Held-out prompts dataset (None = a seeded draw from prompts "
                                                       "that training never sees).")
    n_prompts: int = Field(128, ge=1, description="Training prompts per iteration.")
    fresh_prompts: bool = Field(True, description="Draw new training prompts each iteration.")
    iterations: int = Field(2, ge=1, description="Most generate-judge-train iterations.")
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description="Where shards run.")
    workers: int = Field(2, ge=1, description="Concurrent shards (threads or Dask/Ray workers).")
    toy_world: dict[str, Any] = Field(default_factory=dict,
                                      description="Extra keyword arguments for the world's builder (build_toy_world "
                                                  "/ build_bpe_world), e.g. {task: {length_weight: 0.5}}.")
    constitutional: ConstitutionalConfig = Field(default_factory=ConstitutionalConfig,
                                                 description="Optional Constitutional SFT stage.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Labelling.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    termination: TerminationConfig = Field(default_factory=TerminationConfig, description="Stopping rule.")

    @field_validator("train")
    @classmethod
    def _known_loss(cls, value: TrainConfig) -> TrainConfig:
        return _check_loss(value)


class GenerateFeedbackConfig(_Strict):
    """``generate_feedback``: prompts -> K samples -> judge -> pairwise | listwise | binary dataset."""

    name: str = Field("generate-feedback", description="Run name.")
    output: str | None = Field(None, description="Run folder (rerun with the same folder resumes).")
    seed: int = Field(0, description="Seed.")
    model: str = Field(..., description="Policy checkpoint that samples.")
    prompts: str = Field(..., description="Prompts dataset folder.")
    task_runner: Literal["threads", "dask", "ray"] = Field("threads", description="Where shards run.")
    workers: int = Field(2, ge=1, description="Concurrent shards.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="Labelling.")
    verifier: str | None = Field(None, description="judge=verifier: 'module:function' taking (prompts, "
                                                   "responses) and returning rewards (None = the toy task).")


class CritiqueReviseConfig(_Strict):
    """``critique_revise``: Constitutional AI critique-revision of sampled responses."""

    name: str = Field("critique-revise", description="Run name.")
    output: str | None = Field(None, description="Run folder.")
    seed: int = Field(0, description="Seed.")
    model: str = Field(..., description="Checkpoint that answers, critiques and revises.")
    prompts: str = Field(..., description="Prompts dataset folder.")
    constitution: str | None = Field(None, description="Constitution YAML (None = built-in).")
    rounds: int = Field(1, ge=1, description="Critique-revision rounds.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling.")


class TrainFlowConfig(_Strict):
    """``train``: one training stage on a dataset of the store."""

    name: str = Field("train", description="Run name.")
    output: str | None = Field(None, description="Run folder (the checkpoint goes to <run>/model).")
    dataset: str = Field(..., description="Dataset folder (pairwise, listwise or binary).")
    model: str = Field(..., description="Starting checkpoint.")
    reference: str | None = Field(None, description="Reference checkpoint for ref_* columns (None = model).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")

    @field_validator("train")
    @classmethod
    def _known_loss(cls, value: TrainConfig) -> TrainConfig:
        return _check_loss(value)


class ConvertLabelsConfig(_Strict):
    """``convert_labels``: keyword arguments passed to flows.convert_labels.convert_labels."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("convert-labels", description="Run name.")
    output: str | None = Field(None, description="Run folder (the converted dataset goes to <output>/<to_format> "
                                                 "unless `out` is given).")


CONFIGS: dict[str, type[BaseModel]] = {
    "align": AlignConfig,
    "generate_feedback": GenerateFeedbackConfig,
    "critique_revise": CritiqueReviseConfig,
    "train": TrainFlowConfig,
    "convert_labels": ConvertLabelsConfig,
}
FLOW_ALIASES = {"align_from_prompts": "align", "align-from-prompts": "align",
                "generate-feedback": "generate_feedback", "critique-revise": "critique_revise",
                "convert-labels": "convert_labels"}


def _check_loss(value: TrainConfig) -> TrainConfig:
    try:
        from alignflow.trainers.losses import LOSSES
    except ImportError:  # the loss library is optional at config time
        return value
    if value.loss not in LOSSES:
        raise ValueError(f"unknown loss {value.loss!r}; known: {', '.join(sorted(LOSSES))}")
    return value


def flow_name(name: str) -> str:
    """Canonical flow name of ``name`` (accepts dashes and the long align name)."""
    name = FLOW_ALIASES.get(name, name)
    if name not in CONFIGS:
        raise ValueError(f"unknown flow {name!r}; known flows: {', '.join(CONFIGS)}")
    return name


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ValueError(f"override {text!r}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Nested dict with each ``key=value`` override set (creates intermediate dicts)."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_config(flow: str, path: str | Path | None = None, overrides: list[str] | None = None) -> BaseModel:
    """The validated config of ``flow`` from a YAML file (or defaults) plus overrides.

    Raises ``ValueError`` with one line naming the file and the field on bad input.
    """
    import yaml
    from pydantic import ValidationError

    model = CONFIGS[flow_name(flow)]
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of fields")
    data = apply_overrides(data, list(overrides or []))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ValueError(f"{path or 'config'}: field {where}: {err['msg']}") from None


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every field, nested models expanded."""
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.append((prefix + name, "", info.description or ""))
            rows.extend(describe(annotation, prefix + name + "."))
        else:
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            rows.append((prefix + name, default, info.description or ""))
    return rows


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML next to the run's outputs."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path
