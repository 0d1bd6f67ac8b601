"""The toy world's model: a character-level tokenizer with a chat template and a tiny Llama.

Everything is built locally from a config (no hub access): the tokenizer with the ``tokenizers``
library, the model from ``LlamaConfig``. The saved folder is an ordinary checkpoint that
``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` load without
``trust_remote_code``.

Chat format (one token per character; role markers are single special tokens)::

    <bos><|user|>Write in capitals: abc<|assistant|>ABC<eos>

A system turn, if present, is ``<|system|>...`` before the first user turn.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT]

# Printable ASCII (letters, digits, punctuation, space) plus newline and tab: one id each.
CHARACTERS = sorted(set(string.printable) - {"\r", "\x0b", "\x0c"})

# Jinja chat template. Each assistant turn ends with <eos>, so the SFT target
# (response + eos) and generation (stop at eos) agree.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}" + SYSTEM + "{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def make_char_tokenizer(model_max_length: int = 2048):
    """A ``PreTrainedTokenizerFast`` with one token per character and the toy chat template.

    Ids: the special tokens first (pad=0, bos=1, eos=2, unk=3, system, user, assistant), then
    one id per printable ASCII character. Characters outside the vocabulary map to ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token; decoding concatenates them.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=model_max_length,
        padding_side="left",  # generation pads on the left; training collators pad themselves
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama(tokenizer, hidden_size: int = 96, num_layers: int = 2, num_heads: int = 4,
                    intermediate_size: int | None = None, max_position_embeddings: int = 2048,
                    seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` sized for a 2-core CPU (~0.2 M parameters).

    Its context (2048 characters) holds every judge prompt (the rubric's template alone is ~1,100
    characters); judges fit prompts to it (``feedback.context``). Rotary positions are computed
    on the fly, so the context size changes no weight.

    The input and output embeddings are tied (the vocabulary is ~100 characters, so the
    embedding is a small share of the parameters anyway). Initialisation is seeded.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_checkpoint(model, tokenizer, path: str | Path) -> Path:
    """Write model weights (safetensors), config and tokenizer into ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
