#!/usr/bin/env bash
# The GPU checks in one run (CUDA): every test marked `gpu` (bf16 losses and generation, the online
# trainers on cuda: rloo, ppo, iterative dpo/cringe/sppo, nash-md, dro-v, paft, reward and preference
# models; tests/test_gpu.py). Use where a device is lent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests --durations=10 "$@"
