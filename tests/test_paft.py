"""PAFT (survey 3.7.2, eq. 43): the merge is W_pre + w_sft*dW_sft + w_dpo*dW_dpo exactly, and the
L1 sparsity term of the SFT branch is on its delta dW_sft (the survey: "SFT + l1 norm ... to
increase the sparsity of pi_delta^SFT"), not on the LoRA factors."""

from __future__ import annotations

import pytest
import torch


def _peft(seed: int = 0, **over):
    from alignflow.trainers.online.paft import PAFTConfig, add_paft_adapters
    from alignflow.trainers.toy_model import make_char_tokenizer, make_tiny_llama

    tok = make_char_tokenizer()
    base = make_tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, seed=seed)
    pre = {k: v.detach().clone() for k, v in base.state_dict().items()}
    cfg = PAFTConfig(**over)
    model = add_paft_adapters(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking adapters: both factors non-zero (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, pre, cfg, tok


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """{base weight name: scaling * B @ A} of one adapter, by hand from its factors."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            key = name.replace("base_model.model.", "") + ".weight"
            out[key] = (b.double() @ a.double()) * module.scaling[adapter]
    return out


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 1.3)])
def test_merge_is_the_pretrained_weights_plus_both_deltas(weights):
    from alignflow.trainers.online.paft import merge_adapters

    model, pre, cfg, _ = _peft(weights=weights)
    d_sft, d_dpo = _deltas(model, "sft"), _deltas(model, "dpo")
    assert d_sft and d_sft.keys() == d_dpo.keys() and all(d.abs().max() > 1e-4 for d in d_sft.values())
    merged = merge_adapters(model, cfg).state_dict()
    assert merged.keys() == pre.keys()
    for key, w in pre.items():
        expected = w.double() + weights[0] * d_sft.get(key, 0.0) + weights[1] * d_dpo.get(key, 0.0)
        assert torch.allclose(merged[key].double(), expected, atol=1e-6, rtol=0), key


def test_l1_term_is_on_the_sft_delta():
    from alignflow.trainers.online.paft import adapter_params, l1_penalty

    model, _, _, _ = _peft()
    by_hand = sum(d.abs().sum() for d in _deltas(model, "sft").values())
    got = l1_penalty(model, "sft")
    assert float(got) == pytest.approx(float(by_hand), rel=1e-5)
    factors = sum(p.abs().sum() for p in adapter_params(model, "sft"))
    assert abs(float(factors) - float(by_hand)) > 0.1 * float(by_hand)  # a different quantity
    # its gradient reaches both factors of the sft adapter only, and a step along it shrinks |dW|
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params(model, "sft"))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in adapter_params(model, "dpo"))
    with torch.no_grad():
        for p in adapter_params(model, "sft"):
            p -= 1e-3 * p.grad
    assert float(l1_penalty(model, "sft")) < float(got)
