"""CUDA checks (bf16): run with `bash tests/gpu.sh` where a GPU is lent; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from schemas.generator import SamplingParams
from trainers.losses import LOSSES, compute_loss, loss_spec

pytestmark = pytest.mark.gpu

PAIRWISE = [name for name in LOSSES if loss_spec(name).kind == "pairwise" and not loss_spec(name).extra_keys]


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_losses_on_cuda_bf16_match_float64_cpu(name):
    gen = torch.Generator().manual_seed(0)
    batch = {k: -torch.rand(16, generator=gen, dtype=torch.float64) * 50
             for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    batch["chosen_tokens"] = torch.randint(1, 40, (16,), generator=gen).double()
    batch["rejected_tokens"] = torch.randint(1, 40, (16,), generator=gen).double()
    reference = compute_loss(name, batch)
    on_gpu = {k: v.to("cuda", torch.bfloat16).requires_grad_(k.endswith("logps") and not k.startswith("ref"))
              for k, v in batch.items()}
    loss = compute_loss(name, on_gpu)
    loss.float().sum().backward()
    assert torch.isfinite(loss.float()).all()
    assert torch.isfinite(on_gpu["chosen_logps"].grad.float()).all()
    torch.testing.assert_close(loss.double().cpu(), reference, rtol=5e-2, atol=5e-2)


def test_hf_generator_on_cuda_matches_seeded_cpu_shapes(toy_world):
    from feedback.generation.hf import HFGenerator

    prompts = [[{"role": "user", "content": p}] for p in toy_world.task.prompts(8, seed=3)]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=32, seed=0)
    gpu = HFGenerator(toy_world.path, device="cuda", dtype=torch.bfloat16).generate(prompts, n=2, sampling=sampling)
    assert [len(g) for g in gpu] == [2] * 8
    assert all(s.n_tokens > 0 and s.logp is not None and s.logp <= 0 for g in gpu for s in g)
