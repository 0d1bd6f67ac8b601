"""A recording fake of the ``vllm`` module, backed by a transformers model on the CPU.

Only what alignflow calls is implemented, each with vLLM 0.33.0's real signature and checks
(read from its source: ``vllm/entrypoints/llm.py``, ``vllm/sampling_params.py``,
``vllm/inputs/llm.py``, ``vllm/outputs.py``, ``vllm/logprobs.py``, ``vllm/engine/arg_utils.py``,
``vllm/v1/worker/gpu_model_runner.py``); an unknown keyword fails as the real one fails:

* ``LLM(model, *, <LLM keywords>, **kwargs)``: kwargs must be ``EngineArgs`` fields
  (``TypeError: EngineArgs.__init__() got an unexpected keyword argument``);
* ``LLM.generate(prompts, sampling_params=None, *, use_tqdm, lora_request, priority,
  tokenization_kwargs, mm_processor_kwargs) -> list[RequestOutput]``; prompts are
  ``TokensPrompt`` dicts (unknown keys refused) or strings;
* ``SamplingParams(**fields)``: a msgspec struct (unknown field: ``TypeError: Unexpected keyword
  argument``), with ``_verify_args``'s range checks; children of an ``n > 1`` request are seeded
  ``seed + index`` (``v1/engine/parallel_sampling.py``);
* log-probs are ``raw_logprobs`` (log_softmax of the raw logits); the stop token stays in
  ``CompletionOutput.token_ids`` and out of the text (``v1/engine/detokenizer.py``); a stop string
  is cut from the text; ``prompt_logprobs[0]`` is None;
* ``sleep(level=1, mode="abort")``, ``wake_up(tags=None)`` (sleep mode only; level 2 discards the
  weights: generating before they are reloaded is refused here, where a GPU would compute garbage);
* ``collective_rpc(method, timeout=None, args=(), kwargs=None)`` with the worker's
  ``reload_weights(weights_iterator=None, weights_path=None, is_checkpoint_format=True)``;
* ``llm_engine.engine_core.shutdown(timeout=None)``.

Every call is appended to ``LLM.calls`` (and ``CALLS``, module-wide) as (name, arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

import torch

__version__ = "0.33.0+alignflow-fake"
CALLS: list[tuple[str, dict]] = []
ENGINES: list["LLM"] = []  # every LLM built (tests check one engine per process)

ENGINE_ARGS = set("""
    model enable_return_routed_experts return_sampling_mask model_weights served_model_name tokenizer
    hf_config_path runner convert skip_tokenizer_init enable_prompt_embeds tokenizer_mode trust_remote_code
    allowed_local_media_path allowed_media_domains download_dir safetensors_load_strategy
    safetensors_prefetch_num_threads safetensors_prefetch_block_size load_format config_format dtype
    kv_cache_dtype seed max_model_len cudagraph_capture_sizes max_cudagraph_capture_size ir_op_priority
    distributed_executor_backend pipeline_parallel_size master_addr master_port nnodes node_rank
    distributed_timeout_seconds cpu_distributed_timeout_seconds numa_bind numa_bind_nodes numa_bind_cpus
    device_ids tensor_parallel_size prefill_context_parallel_size decode_context_parallel_size
    dcp_comm_backend dcp_q_replicate dcp_kv_cache_interleave_size cp_kv_cache_interleave_size
    data_parallel_size data_parallel_rank data_parallel_start_rank data_parallel_size_local
    data_parallel_address data_parallel_rpc_port data_parallel_hybrid_lb data_parallel_external_lb
    data_parallel_multi_port_external_lb data_parallel_backend enable_hc_sp enable_expert_parallel
    enable_batch_sharded_sampling enable_ep_weight_filter moe_backend linear_backend
    sparse_indexer_topk_backend all2all_backend enable_elastic_ep elastic_ep_max_dp_size enable_dbo
    ubatch_size dbo_decode_token_threshold dp_sync_interval dbo_prefill_token_threshold
    disable_nccl_for_dp_synchronization eplb_config enable_eplb expert_placement_strategy _api_process_count
    _api_process_rank max_parallel_loading_workers block_size enable_prefix_caching prefix_caching_hash_algo
    prefix_cache_retention_interval disable_sliding_window disable_cascade_attn offload_backend
    cpu_offload_gb cpu_offload_params offload_group_size offload_num_in_group offload_prefetch_step
    offload_params gpu_memory_utilization kv_cache_memory_bytes max_num_batched_tokens
    max_num_scheduled_tokens long_prefill_token_threshold long_prefill_token_threshold_adaptive max_num_seqs
    max_num_active_seqs max_num_queued_reqs max_num_queued_tokens max_logprobs logprobs_mode use_fp64_gumbel
    enable_trace_replay disable_log_stats aggregate_engine_logging revision code_revision hf_token
    hf_overrides model_class_overrides tokenizer_revision quantization quantization_config
    allow_deprecated_quantization enforce_eager disable_custom_all_reduce enable_shm_tensor_arena
    language_model_only limit_mm_per_prompt enable_mm_embeds interleave_mm_strings media_io_kwargs
    mm_processor_kwargs mm_processor_cache_gb mm_processor_cache_type mm_hasher_algorithm
    mm_shm_cache_max_object_size_mb mm_encoder_only mm_encoder_tp_mode mm_encoder_attn_backend
    mm_encoder_attn_dtype mm_encoder_fp8_scale_path mm_encoder_fp8_scale_save_path
    mm_encoder_fp8_scale_save_margin io_processor_plugin renderer_num_workers skip_mm_profiling
    video_pruning_rate video_pruning_method mm_tensor_ipc mm_processor_device mm_ipc_gpu_memory_gb
    mm_device_do_normalize enable_lora max_loras max_lora_rank default_mm_loras fully_sharded_loras
    max_cpu_loras lora_dtype lora_target_modules enable_tower_connector_lora specialize_active_lora
    enable_mixed_moe_lora_format enable_moe_shared_loras max_lora_cls_labels ray_workers_use_nsight
    num_gpu_blocks_override model_loader_extra_config ignore_patterns enable_chunked_prefill
    disable_chunked_mm_input scheduler_reserve_full_isl prefill_schedule_interval watermark
    disable_hybrid_kv_cache_manager structured_outputs_config aux_output_config reasoning_parser
    reasoning_parser_plugin speculative_config spec_method spec_model spec_tokens watermark_config
    diffusion_config show_hidden_metrics_for_version otlp_traces_endpoint collect_detailed_traces
    per_request_spec_decode_metrics kv_cache_metrics kv_cache_metrics_sample custom_histogram_buckets
    cudagraph_metrics enable_layerwise_nvtx_tracing enable_mfu_metrics enable_logging_iteration_details
    jit_monitor_mode jit_monitor_verbose enable_mm_processor_stats scheduling_policy scheduler_cls
    pooler_config compilation_config attention_config engram_config mamba_config kernel_config
    enable_flashinfer_autotune monokernel worker_cls worker_extension_cls profiler_config logging_config
    log_level log_config_file kv_transfer_config kv_events_config ec_transfer_config ec_manager_config
    reasoning_config generation_config enable_sleep_mode sleep_mode_backend sleep_mode_offload_cudagraph
    sleep_preserve_parameter_names enable_cumem_allocator enable_nccl_comm_suspend
    override_generation_config model_impl attention_backend kv_cache_dtype_skip_layers mamba_cache_dtype
    mamba_ssm_cache_dtype mamba_block_size prefix_match_unit mamba_cache_mode
    enable_mamba_shared_prefix_checkpoint replayssm_buffer_len use_replayssm mamba_backend
    mamba_ssu_algorithm enable_mamba_cache_stochastic_rounding mamba_cache_philox_rounds additional_config
    use_tqdm_on_load pt_load_map_location logits_processors async_scheduling stream_interval
    kv_sharing_fast_prefill swa_bounded_replay optimization_level performance_mode fault_tolerance_config
    enable_fault_tolerance kv_offloading_size kv_offloading_backend tokens_only shutdown_timeout
    watchdog_config weight_transfer_config fail_on_environ_validation gdn_prefill_backend
    kda_prefill_backend kda_decode_backend
""".split())
_LLM_KEYWORDS = set("""runner convert tokenizer tokenizer_mode skip_tokenizer_init trust_remote_code allowed_local_media_path
    allowed_media_domains tensor_parallel_size dtype quantization revision tokenizer_revision chat_template seed
    gpu_memory_utilization cpu_offload_gb offload_group_size offload_num_in_group offload_prefetch_step offload_params
    enforce_eager enable_return_routed_experts return_sampling_mask disable_custom_all_reduce hf_token hf_overrides
    mm_processor_kwargs pooler_config structured_outputs_config profiler_config attention_config kv_cache_memory_bytes
    compilation_config quantization_config logits_processors spec_method spec_model spec_tokens""".split())
_DTYPES = {"auto": torch.float32, "float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16}
_SAMPLING_FIELDS = {
    "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 1.0,
    "watermarking": None, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": None, "stop_token_ids": None,
    "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None, "prompt_logprobs": None,
    "prompt_logprob_token_ids": None, "prompt_logprob_start": None, "logprob_token_ids": None, "flat_logprobs": False,
    "detokenize": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False, "output_kind": None, "stream_interval": None, "skip_clone": False,
    "output_text_buffer_length": 0, "structured_outputs": None, "logit_bias": None, "allowed_token_ids": None,
    "extra_args": None, "bad_words": None, "skip_reading_prefix_cache": None, "thinking_token_budget": None,
    "repetition_detection": None, "routed_experts_prompt_start": 0, "trace_decode_token_ids": None,
}
_UNSUPPORTED_HERE = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "min_p": 0.0,
                     "min_tokens": 0, "logit_bias": None, "allowed_token_ids": None, "bad_words": None}


class VLLMValidationError(ValueError):
    pass


class SamplingParams:
    """``vllm.SamplingParams`` (a msgspec Struct in vLLM): fields, defaults and checks of 0.33."""

    def __init__(self, **kwargs: Any):
        for name in kwargs:
            if name not in _SAMPLING_FIELDS:
                raise TypeError(f"Unexpected keyword argument '{name}'")
        for name, default in _SAMPLING_FIELDS.items():
            setattr(self, name, kwargs.get(name, default))
        CALLS.append(("SamplingParams", dict(kwargs)))
        if self.seed == -1:
            self.seed = None
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        self._verify_args()
        if self.temperature < 1e-5:  # greedy
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        for name, neutral in _UNSUPPORTED_HERE.items():
            if getattr(self, name) not in (neutral, [], None):
                raise NotImplementedError(f"the fake does not implement {name}")

    def _verify_args(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value != -1 and value < 0:
                raise VLLMValidationError(f"{name} must be non-negative or -1, got {value}.")
        if any(not s for s in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"Expected `int | None`, got `{type(self.seed).__name__}` - at `$.seed`")


class TokensPrompt(TypedDict):
    """``vllm.inputs.TokensPrompt`` (with ``_PromptOptions``)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
    prompt_token_offsets: NotRequired[list[tuple[int, int]] | None]
    multi_modal_data: NotRequired[Any]
    media_io_kwargs: NotRequired[Any]
    mm_processor_kwargs: NotRequired[Any]
    multi_modal_uuids: NotRequired[Any]
    cache_salt: NotRequired[str]


_PROMPT_KEYS = set(TokensPrompt.__annotations__)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None
    sampling_mask: Any = None
    spec_decode_metrics: Any = None
    weight_versions: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None
    lora_request: Any = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    num_cached_tokens: int | None = None
    extra: dict = field(default_factory=dict)


class _EngineCore:
    def __init__(self, llm: "LLM"):
        self.llm = llm

    def shutdown(self, timeout: float | None = None) -> None:
        self.llm._record("engine_core.shutdown", timeout=timeout)
        self.llm.shut_down = True
        self.llm.model = None


class _LLMEngine:
    def __init__(self, llm: "LLM"):
        self.engine_core = _EngineCore(llm)


class LLM:
    """``vllm.LLM`` over a transformers model on the CPU (see the module doc)."""

    def __init__(self, model: str, *, tokenizer: str | None = None, trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        for name in kwargs:
            if name not in _LLM_KEYWORDS and name not in ENGINE_ARGS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{name}'")
        self.calls: list[tuple[str, dict]] = []
        self.args = dict(model=model, tokenizer=tokenizer, trust_remote_code=trust_remote_code,
                         tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                         gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        self._record("LLM", **self.args)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"GPU memory utilization must be within (0, 1]. Got {gpu_memory_utilization}.")
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype: {dtype!r}")
        if kwargs.get("logprobs_mode", "raw_logprobs") not in ("raw_logprobs", "processed_logprobs", "raw_logits",
                                                                "processed_logits"):
            raise ValueError(f"Invalid logprobs_mode: {kwargs['logprobs_mode']}")
        if trust_remote_code:
            raise AssertionError("the fake refuses trust_remote_code (alignflow never asks for it unbidden)")
        self.enable_sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        self.max_model_len = kwargs.get("max_model_len")
        self.dtype = _DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype).eval()
        self.weights_path = model
        self.sleeping_tags: set[str] = set()
        self.weights_discarded = False
        self.shut_down = False
        self.llm_engine = _LLMEngine(self)
        self._rng = torch.Generator().manual_seed(seed)
        ENGINES.append(self)

    def _record(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))
        CALLS.append((name, arguments))

    def get_tokenizer(self):
        self._record("get_tokenizer")
        return self.tokenizer

    # -- memory and weights -----------------------------------------------------------------
    def sleep(self, level: int = 1, mode: str = "abort"):
        self._record("sleep", level=level, mode=mode)
        if level not in (0, 1, 2) or mode not in ("abort", "wait", "keep"):
            raise ValueError(f"bad sleep level {level!r} or mode {mode!r}")
        if level >= 1 and not self.enable_sleep_mode:
            raise AssertionError("sleep mode is not enabled (LLM(enable_sleep_mode=True))")
        if level >= 1:
            self.sleeping_tags = {"weights", "kv_cache"}
            if level == 2:
                self.weights_discarded = True  # the weights' memory is freed: content forgotten
        else:
            self.sleeping_tags = {"scheduling"}

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self._record("wake_up", tags=tags)
        if tags is not None and any(t not in ("weights", "kv_cache", "scheduling") for t in tags):
            raise ValueError(f"unknown wake_up tags {tags}")
        self.sleeping_tags -= set(tags) if tags is not None else set(self.sleeping_tags)
        return not self.sleeping_tags

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        self._record("collective_rpc", method=method, timeout=timeout, args=args, kwargs=kwargs)
        if method != "reload_weights":
            raise AttributeError(f"the fake worker has no method {method!r}")
        self._reload_weights(*args, **(kwargs or {}))
        return [None]  # one worker

    def _reload_weights(self, weights_iterator=None, weights_path: str | None = None,
                        is_checkpoint_format: bool = True) -> None:
        from transformers import AutoModelForCausalLM

        if "weights" in self.sleeping_tags:
            raise AssertionError("reload_weights while the weights' memory is asleep (wake_up(tags=['weights']) first)")
        if weights_iterator is None:
            path = weights_path or self.weights_path
            if weights_path is not None:
                self.weights_path = weights_path
            state = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).state_dict()
            weights_iterator = state.items()
        own = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights_iterator:
                own[name].copy_(tensor)
        self.weights_discarded = False

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None) -> list[RequestOutput]:
        self._record("generate", prompts=prompts, sampling_params=sampling_params, use_tqdm=use_tqdm)
        if self.shut_down:
            raise RuntimeError("engine core is shut down")
        if self.sleeping_tags or self.weights_discarded:
            raise RuntimeError(f"generate on a sleeping engine (asleep: {sorted(self.sleeping_tags)}, weights "
                               f"{'discarded' if self.weights_discarded else 'kept'})")
        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        outputs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            if isinstance(prompt, dict):
                unknown = set(prompt) - _PROMPT_KEYS
                if unknown or "prompt_token_ids" not in prompt:
                    raise TypeError(f"not a TokensPrompt: keys {sorted(prompt)}")
                ids = [int(t) for t in prompt["prompt_token_ids"]]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
            if not ids:
                raise ValueError("The decoder prompt cannot be empty")
            if self.max_model_len is not None and len(ids) > self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model length "
                                 f"of {self.max_model_len}.")
            outputs.append(self._request(str(i), ids, sp))
        return outputs

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a toy-sized model: more threads only spin on a shared CPU
        try:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        finally:
            torch.set_num_threads(threads)
        return torch.log_softmax(logits, -1)  # raw_logprobs: before temperature and top-k/p

    def _top(self, row: torch.Tensor, chosen: int, k: int) -> dict[int, Logprob]:
        ranks = (row > row[chosen]).sum().item() + 1
        out = {chosen: Logprob(float(row[chosen]), int(ranks), self.tokenizer.decode([chosen]))}
        if k:
            values, idx = torch.topk(row, k if k > 0 else row.numel())
            for r, (v, t) in enumerate(zip(values.tolist(), idx.tolist()), start=1):
                out.setdefault(t, Logprob(v, r, self.tokenizer.decode([t])))
        return out

    def _request(self, request_id: str, ids: list[int], sp: SamplingParams) -> RequestOutput:
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:
            rows = self._logprobs(ids)
            prompt_logprobs = [None] + [self._top(rows[t - 1], ids[t], sp.prompt_logprobs) for t in range(1, len(ids))]
        completions = [self._complete(index, ids, sp) for index in range(sp.n)]
        return RequestOutput(request_id, None, list(ids), prompt_logprobs, completions, True)

    def _complete(self, index: int, ids: list[int], sp: SamplingParams) -> CompletionOutput:
        gen = torch.Generator().manual_seed(sp.seed + index) if sp.seed is not None else self._rng
        eos = {self.tokenizer.eos_token_id} | set(sp.stop_token_ids)
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= {extra} if isinstance(extra, int) else set(extra or [])
        tokens: list[int] = []
        steps: list[dict[int, Logprob]] = []
        finish, stop_reason, text = "length", None, ""
        limit = sp.max_tokens if sp.max_tokens is not None else 10**9
        while len(tokens) < limit:
            row = self._logprobs(ids + tokens)[-1]
            token = self._sample(row, sp, gen)
            tokens.append(token)
            if sp.logprobs is not None:
                steps.append(self._top(row, token, sp.logprobs))
            if token in eos and not sp.ignore_eos:
                finish, stop_reason = "stop", None if token == self.tokenizer.eos_token_id else token
                break
            text = self.tokenizer.decode(tokens, skip_special_tokens=sp.skip_special_tokens)
            hit = [(text.find(s), s) for s in sp.stop if s in text]
            if hit:
                cut, stop_reason = min(hit)
                text, finish = text[:cut] + (stop_reason if sp.include_stop_str_in_output else ""), "stop"
                break
        if finish != "stop" or stop_reason is None or isinstance(stop_reason, int):
            text = self.tokenizer.decode([t for t in tokens if t not in eos or sp.ignore_eos],
                                         skip_special_tokens=sp.skip_special_tokens)
        logprobs = steps if sp.logprobs is not None else None
        cumulative = float(sum(step[t].logprob for step, t in zip(steps, tokens))) if logprobs is not None else None
        return CompletionOutput(index, text, tokens, cumulative, logprobs, finish_reason=finish,
                                stop_reason=stop_reason)

    @staticmethod
    def _sample(row: torch.Tensor, sp: SamplingParams, gen: torch.Generator) -> int:
        if sp.temperature < 1e-5:
            return int(row.argmax())
        logits = row / sp.temperature
        if sp.top_k > 0:
            kth = torch.topk(logits, min(sp.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= sp.top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
