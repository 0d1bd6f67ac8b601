"""The BPE world's model: a byte-level BPE tokenizer trained on the task's corpus, ChatML chat
template, and a tiny Qwen2 (grouped-query attention, tied embeddings).

The real-shaped counterpart of ``trainers.toy_model``: what a released chat checkpoint looks like,
built locally with no hub access. Everything that one-token-per-character code could get away
with differs here:

- tokens are byte-level BPE merges learned from the corpus (several hundred), so one character is
  not one token and a token may hold several characters ("forty" is one token, " hundred" another);
  digits stay single tokens (the Qwen2 pre-tokenizer splits them), so a number is spelled from
  its digits;
- there is no bos token; eos is the end-of-turn token ``<|im_end|>``; the pad token
  ``<|endoftext|>`` is distinct from eos; ``padding_side`` is left (generation);
- ChatML template, as Qwen2 / many chat models (the template lives in ``tokenizer_config.json``)::

      <|im_start|>user\\nSpell out: 42<|im_end|>\\n<|im_start|>assistant\\nforty-two<|im_end|>\\n

  An assistant turn ends with ``<|im_end|>`` (eos) followed by a newline, so a response's target
  is its tokens plus eos and generation stops at eos.

The saved folder is an ordinary checkpoint that ``AutoTokenizer`` / ``AutoModelForCausalLM`` load
with no custom code and no ``trust_remote_code``.
"""

from __future__ import annotations

from typing import Iterable

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# Qwen2's pre-tokenizer pattern: letters with an optional leading non-letter, single digits,
# punctuation runs, newlines, spaces. Single digits keep numbers compositional.
PRETOKENIZE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}"
)


def train_bpe_tokenizer(corpus: Iterable[str], num_merges: int = 400, model_max_length: int = 2048):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` with the ChatML template.

    Vocabulary: the three special tokens (ids 0..2: ``<|endoftext|>`` pad, ``<|im_start|>``,
    ``<|im_end|>`` eos), the 256 byte symbols, then up to ``num_merges`` merges (fewer only if
    the corpus runs out of pairs seen twice). The same corpus gives the same merges.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()  # as Qwen2's tokenizer (AutoTokenizer loads the folder as one)
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + num_merges, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=model_max_length,
        padding_side="left",  # generation pads on the left; training collators pad themselves
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_qwen2(tokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                    num_kv_heads: int = 2, intermediate_size: int | None = None,
                    max_position_embeddings: int = 2048, seed: int = 0):
    """A freshly initialised ``Qwen2ForCausalLM`` sized for a 2-core CPU: grouped-query attention
    (``num_kv_heads`` < ``num_heads``), tied input/output embeddings, no bos; seeded.

    Its context (2048 tokens, as the tokenizer's ``model_max_length``) holds every judge prompt:
    the judges' instructions are prose the merges never saw, close to one token per character
    (the pairwise prompt needs ~380 tokens before any text). Rotary positions are computed on
    the fly, so the context size changes no weight."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if num_heads % num_kv_heads or num_kv_heads == num_heads:
        raise ValueError(f"grouped-query attention needs num_kv_heads ({num_kv_heads}) to divide num_heads "
                         f"({num_heads}) and be smaller")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def save_tokenizer(tokenizer, path) -> None:
    """Save with the chat template inside ``tokenizer_config.json`` (where most released chat
    checkpoints keep it) rather than transformers 5's separate ``chat_template.jinja``."""
    from pathlib import Path

    tokenizer.save_pretrained(path, save_jinja_files=False)
    (Path(path) / "chat_template.jinja").unlink(missing_ok=True)
