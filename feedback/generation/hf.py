"""The ``hf`` generation backend: a transformers causal LM on CPU or GPU, in process.

Sampling is a hand-written decode loop (prefill once, then one token per step with the KV
cache) over LEFT-padded batches. Why not ``model.generate``: we need the model's own
log-probabilities of each sampled token and per-row random streams.

Determinism: with ``SamplingParams.seed = s`` the j-th sample of the i-th prompt of a call is
drawn by Gumbel-max (argmax of logits / T + Gumbel noise, after top-k / top-p masking) with
noise from its own ``torch.Generator`` seeded from (s, i, j). The result therefore does not
depend on ``batch_size``, on the other prompts of the batch or on padding (up to float rounding
of the logits); CPU and CUDA generators give different streams. ``seed=None`` draws a fresh
seed from torch's global RNG.

Log-probs: ``Generation.logp`` is the sum over the generated tokens (the end-of-sequence token
included when it was sampled) of ``log_softmax(logits)`` of the model at temperature 1, with no
top-k / top-p truncation: the policy's likelihood of the text, what DPO-style losses and
reference log-probs use, not the likelihood under the tempered/truncated sampling distribution.
``token_logps`` holds the per-token terms. ``score`` uses the same definition. With a subword
(BPE) tokenizer ``logp`` is that of the sampled token sequence, which need not be the text's own
tokenization; ``score`` and every trainer re-tokenize the text. The two agree whenever the model
writes a text's own tokenization, as a model fitted to tokenized text almost always does.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from pathlib import Path
from typing import Any, Sequence

from alignflow.schemas.generator import Generation, Messages, SamplingParams


def _as_messages(prompt: Any) -> Messages:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def chat_prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of the chat-templated prompt, generation prompt included (every in-process
    backend renders prompts with this, so their log-probs agree).

    A tokenizer without a chat template (a base model) gets the turns' contents joined by blank
    lines, with the tokenizer's own special tokens (e.g. bos).
    """
    messages = _as_messages(prompt)
    if not getattr(tokenizer, "chat_template", None):
        text = "\n\n".join(m["content"] for m in messages)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Temporarily set torch's intra-op CPU threads (process-wide; restored on exit)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gumbel(generators, vocab: int, device):
    """Standard Gumbel noise [B, V], row b drawn from ``generators[b]`` (Gumbel-max sampling)."""
    import torch

    u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in generators])
    return -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFGenerator:
    """A ``schemas.generator.Generator`` backed by a transformers causal LM.

    Args:
        model_or_path: a ``PreTrainedModel`` or a checkpoint folder / hub id.
        tokenizer: defaults to the one saved with the checkpoint (needs a chat template).
        device: "cpu", "cuda", ... (default: cuda if available).
        batch_size: rows (prompt x sample) per forward pass.
        dtype: torch dtype for a model loaded from a path (default float32).
        trust_remote_code: passed to the Auto classes; off unless asked for.
        num_threads: torch CPU threads while generating/scoring (restored afterwards). "auto":
            1 for a model under 20 M parameters on the CPU (as fast as more threads for such
            a model, and immune to OpenMP spinning on a busy machine), else torch's setting.
            None: leave torch's setting.
    """

    name = "hf"

    def __init__(self, model_or_path: Any, tokenizer: Any = None, device: str | None = None,
                 batch_size: int = 64, dtype: Any = None, trust_remote_code: bool = False,
                 num_threads: int | str | None = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model_or_path, (str, Path)):
            path = str(model_or_path)
            self.model_name = path
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32,
                                                         trust_remote_code=trust_remote_code)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = model.to(device or _default_device()).eval()
        else:
            # A live model (e.g. the policy of an online trainer) stays where it is unless a
            # device is named; its train/eval mode is restored after each call.
            model = model_or_path if device is None else model_or_path.to(device)
            self.model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            raise ValueError("HFGenerator needs a tokenizer when given a model object")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids()
        if num_threads == "auto":
            small = sum(p.numel() for p in self.model.parameters()) < 20_000_000
            num_threads = 1 if small else None
        self.num_threads = num_threads
        # transformers >= 5 names the KV cache argument ``cache``; older releases ``past_key_values``.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """Most tokens the model takes (prompt and generation): the config's
        ``max_position_embeddings``, else the tokenizer's ``model_max_length`` if set."""
        from alignflow.feedback.context import tokenizer_context

        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else tokenizer_context(self.tokenizer)

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode, no autograd, CPU thread setting; the model's mode is restored after."""
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), cpu_threads(self.num_threads if self.device.type == "cpu" else None):
                yield
        finally:
            if was_training:
                self.model.train()

    def _eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(extra)
        return {i for i in ids if i is not None}

    # -- tokenization --------------------------------------------------------------------
    def prompt_ids(self, prompt: Any) -> list[int]:
        """Token ids of the chat-templated prompt, generation prompt included (``chat_prompt_ids``)."""
        return chat_prompt_ids(self.tokenizer, prompt)

    def _left_pad(self, seqs: Sequence[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[list[Generation]]:
        """``n`` responses for each prompt (a message list or plain text)."""
        import torch

        sampling = sampling or SamplingParams()
        seed = sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        with self._inference():
            return self._generate(prompts, n, sampling, seed)

    def _generate(self, prompts, n, sampling, seed) -> list[list[Generation]]:
        encoded = [self.prompt_ids(p) for p in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        # Similar lengths together: less padding. Results go back to their (i, j) slot.
        rows.sort(key=lambda r: len(encoded[r[0]]))
        results: list[list[Generation | None]] = [[None] * n for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            gens = self._generate_batch([encoded[i] for i, _ in chunk],
                                        [_row_seed(seed, i, j) for i, j in chunk], sampling)
            for (i, j), gen in zip(chunk, gens):
                results[i][j] = gen
        return results  # type: ignore[return-value]

    @staticmethod
    def _filter_logits(logits, sampling: SamplingParams):
        """Temperature, top-k and top-p applied to logits [B, V] (masked entries -> -inf)."""
        import torch

        logits = logits / sampling.temperature
        if sampling.top_k and sampling.top_k < logits.shape[-1]:
            kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the mass before it already reaches top_p (the first always stays).
            drop_sorted = (probs.cumsum(-1) - probs) >= sampling.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    def _generate_batch(self, seqs: list[list[int]], row_seeds: list[int],
                        sampling: SamplingParams) -> list[Generation]:
        import torch
        from transformers import DynamicCache

        batch = len(seqs)
        device = self.device
        max_new = sampling.max_new_tokens
        greedy = sampling.temperature <= 0
        with torch.inference_mode():
            input_ids, mask = self._left_pad(seqs)
            generators = None
            if not greedy:
                # One random stream per row, advanced one draw of [V] per step: memory stays
                # [B, V] whatever max_new_tokens, and a row's samples ignore its batch mates.
                generators = [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
            eos = torch.tensor(sorted(self.eos_ids), device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()  # filled in place by every forward call below
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            next_pos = positions[:, -1:] + 1
            tokens = torch.full((batch, max_new), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
            logps = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
            lengths = torch.zeros(batch, dtype=torch.long, device=device)
            stop_texts = sampling.stop
            rows = torch.arange(batch, device=device)  # original row of each row still in the batch
            live = torch.ones(batch, dtype=torch.bool, device=device)  # [b] not finished yet
            for step in range(max_new):
                logits = out.logits[:, -1, :].float()  # [b, V]
                if greedy:
                    token = logits.argmax(-1)
                else:
                    token = (self._filter_logits(logits, sampling) + _gumbel(generators, logits.shape[-1], device)).argmax(-1)
                token_logp = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)
                alive_rows = rows[live]
                tokens[alive_rows, step] = token[live]
                logps[alive_rows, step] = token_logp[live]
                lengths[alive_rows] += 1
                finished = torch.isin(token, eos)
                if stop_texts:
                    finished |= self._hit_stop(tokens, lengths, rows, live, stop_texts)
                live &= ~finished
                if not bool(live.any()) or step == max_new - 1:
                    break
                if int(live.sum()) <= 0.75 * live.numel():
                    # Drop finished rows from the batch (KV cache included): later steps cost
                    # only what the unfinished rows need.
                    keep = live.nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    rows, mask, next_pos, token = rows[keep], mask[keep], next_pos[keep], token[keep]
                    if generators is not None:
                        generators = [generators[i] for i in keep.tolist()]
                    live = live[keep]
                mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=-1)
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                                 use_cache=True, **{self._cache_kwarg: cache})
                next_pos = next_pos + 1
        return [self._to_generation(tokens[b, : lengths[b]].tolist(), logps[b, : lengths[b]].tolist(), stop_texts)
                for b in range(batch)]

    def _hit_stop(self, tokens, lengths, rows, live, stop_texts):
        """[b] bool: the live row's decoded text so far contains a stop string."""
        import torch

        hit = torch.zeros_like(live)
        for local, row in enumerate(rows.tolist()):
            if not live[local]:
                continue
            text = self.tokenizer.decode(tokens[row, : lengths[row]].tolist(), skip_special_tokens=True)
            hit[local] = any(stop in text for stop in stop_texts)
        return hit

    def _to_generation(self, token_ids: list[int], token_logps: list[float], stop_texts) -> Generation:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        for stop in stop_texts:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return Generation(text=text, n_tokens=len(token_ids), logp=float(sum(token_logps)),
                          token_logps=token_logps)

    # -- scoring -------------------------------------------------------------------------
    def score(self, prompt: Any, continuations: Sequence[str]) -> list[float]:
        """Summed log-probs of each continuation after the chat-templated prompt (no eos added)."""
        return self.score_batch([prompt] * len(continuations), continuations)

    def score_batch(self, prompts: Sequence[Any], continuations: Sequence[str], add_eos: bool = False,
                    return_tokens: bool = False):
        """Summed log-probs for many (prompt, continuation) pairs, batched.

        The continuation is tokenized on its own (``add_special_tokens=False``) and appended to
        the templated prompt; ``add_eos=True`` appends the end-of-sequence token as well (then
        the sum equals ``Generation.logp`` of a sampled text that ended with eos).
        Returns a list of floats, or (floats, token counts) with ``return_tokens=True``.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        cache: dict[str, list[int]] = {}
        pairs = []
        for p, c in zip(prompts, continuations):
            key = repr(p)
            if key not in cache:
                cache[key] = self.prompt_ids(p)
            cont = self.tokenizer(c, add_special_tokens=False)["input_ids"]
            if add_eos:
                cont = cont + [self.tokenizer.eos_token_id]
            pairs.append((cache[key], cont))
        order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]) + len(pairs[k][1]))
        scores = [0.0] * len(pairs)
        with self._inference():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                seqs = [pairs[k][0] + pairs[k][1] for k in idx]
                input_ids, mask = self._left_pad(seqs)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
                logp = logits[:, :-1, :].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
                width = input_ids.shape[1]
                for row, k in enumerate(idx):
                    n_cont = len(pairs[k][1])
                    # Continuation tokens are the last n_cont of the row; token t is predicted at t-1.
                    scores[k] = float(logp[row, width - 1 - n_cont:].sum()) if n_cont else 0.0
        if return_tokens:
            return scores, [len(p[1]) for p in pairs]
        return scores
