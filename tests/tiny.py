"""Tiny random models in the shape of each embedded world, for tests that need no SFT:
``char`` (the toy world's char-level tokenizer, a Llama) and ``bpe`` (the BPE world's byte-level
BPE tokenizer with the ChatML template, no bos, eos = <|im_end|>, a Qwen2 with grouped-query
attention). Parametrise a fixture over ``TOKENIZERS`` to run a test on both."""

from __future__ import annotations

import copy
import functools

TOKENIZERS = ("char", "bpe")


@functools.cache
def _bpe_tokenizer():
    from alignflow.feedback.toy_task import ToyTask
    from alignflow.flows.bpe_world import tokenizer_corpus
    from alignflow.trainers.bpe_model import train_bpe_tokenizer

    return train_bpe_tokenizer(tokenizer_corpus(ToyTask().sft_examples(2000, seed=0)), num_merges=300)


def tokenizer(kind: str):
    """A fresh tokenizer of ``kind`` (char or bpe); the BPE one is trained once per process."""
    if kind == "char":
        from alignflow.trainers.toy_model import make_char_tokenizer

        return make_char_tokenizer()
    if kind == "bpe":
        return copy.deepcopy(_bpe_tokenizer())
    raise ValueError(kind)


def is_bpe(tok) -> bool:
    return tok.bos_token is None


def tiny_lm(tok, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """A random causal LM for ``tok``: Llama for the char tokenizer, Qwen2 (GQA, 4 heads over 2
    key/value heads) for the BPE one."""
    if is_bpe(tok):
        from alignflow.trainers.bpe_model import make_tiny_qwen2

        return make_tiny_qwen2(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                               seed=seed)
    from alignflow.trainers.toy_model import make_tiny_llama

    return make_tiny_llama(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=2, seed=seed)
