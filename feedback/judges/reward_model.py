"""Reward-model judge: a sequence-classification checkpoint (``AutoModelForSequenceClassification``
with one label) scores the chat-templated conversation ``[prompt..., assistant: response]``.

Pairwise, the Bradley-Terry probability (survey eq. 1) is ``sigmoid(r_a - r_b)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from alignflow.schemas.generator import Messages


class RewardModelJudge:
    name = "reward-model"

    def __init__(self, model_or_path: Any, tokenizer: Any = None, *, device: str | None = None,
                 batch_size: int = 32, max_length: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(model_or_path) if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__") else None
        if self.path is not None:
            self.model = AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=1)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.path)
        else:
            self.model, self.tokenizer = model_or_path, tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def config(self) -> dict:
        return {"judge": self.name, "model": self.path or type(self.model).__name__}

    def _text(self, prompt: Messages | str, response: str) -> str:
        from alignflow.schemas.prompts import messages as to_messages

        conv = to_messages(prompt) + [{"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conv, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in conv)

    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str]) -> np.ndarray:
        import torch

        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"  # the classifier reads the last non-pad token
        try:
            with torch.inference_mode():
                for s in range(0, len(texts), self.batch_size):
                    enc = self.tokenizer(texts[s: s + self.batch_size], return_tensors="pt", padding=True,
                                         add_special_tokens=False, truncation=self.max_length is not None,
                                         max_length=self.max_length).to(self.device)
                    out.extend(self.model(**enc).logits[:, 0].float().tolist())
        finally:
            self.tokenizer.padding_side = side
        return np.asarray(out, dtype=np.float64)

    def pairwise_prob(self, prompts, responses_a, responses_b) -> np.ndarray:
        """Bradley-Terry P(a better) = sigmoid(r_a - r_b), eq. 1."""
        d = self.score(prompts, responses_a) - self.score(prompts, responses_b)
        return 1.0 / (1.0 + np.exp(-d))
