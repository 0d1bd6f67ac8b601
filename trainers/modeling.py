"""Helpers on torch modules every trainer shares: where a model lives, frozen copies, and the
optimizer step."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the device of its first parameter (CPU for a model without
    parameters). Every tensor a trainer builds for a model is put there, so the same code runs
    on CPU and on CUDA."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def context_length(model: torch.nn.Module) -> int | None:
    """How many positions the model was built for (``max_position_embeddings``, or the older
    names ``n_positions`` / ``max_sequence_length`` / ``seq_length``); None when its config says
    none. Sequences are cut to it by default: longer ones are outside what the model was trained
    on, and their attention memory grows with the square of the length."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def colocate(module: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Move ``module`` (a reference policy, a value head) onto ``model``'s device, in place.

    Trainers call it after ``begin_run``: the flow's generator factory moves the live policy to
    its device on first use, and a reference copied before that would stay behind."""
    device = device_of(model)
    return module if device_of(module) == device else module.to(device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached, eval-mode copy (the reference policy, or the previous iterate pi^t)."""
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass
class OptimConfig:
    """Optimizer settings shared by the online trainers."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    extra: dict = field(default_factory=dict)


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Any, max_grad_norm: float) -> float:
    """Backward, clip, step; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], max_grad_norm)
    optimizer.step()
    return float(norm)
