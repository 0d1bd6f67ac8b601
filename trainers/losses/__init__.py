"""Every alignment loss of the survey as a small pure function, registered by name.

```python
from alignflow.trainers.losses import LOSSES, compute_loss
per_example = compute_loss("dpo", batch, beta=0.1)    # Tensor [B]
```

See DESIGN.md's loss table for names, parameters and per-example forms; each function's
docstring names its survey equation, the batch keys and shapes it reads, and its parameters.
"""

from __future__ import annotations

from . import binary, listwise, pairwise, sft, token  # noqa: F401  (importing registers the losses)
from ._util import MissingBatchKeyError, log1mexp
from .binary import kto_kl_from_mismatched, kto_mismatched_indices
from .pairwise import BetaDPOState, pairwise_metrics
from .registry import LOSSES, LossSpec, compute_loss, loss_spec, resolve_params
from .token import cringe_sample_index, cringe_token_contrast, cringe_topk_excluding, sequential_kl

__all__ = [
    "LOSSES",
    "BetaDPOState",
    "LossSpec",
    "MissingBatchKeyError",
    "compute_loss",
    "cringe_sample_index",
    "cringe_token_contrast",
    "cringe_topk_excluding",
    "kto_kl_from_mismatched",
    "kto_mismatched_indices",
    "log1mexp",
    "loss_spec",
    "pairwise_metrics",
    "resolve_params",
    "sequential_kl",
]
