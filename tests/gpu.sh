#!/usr/bin/env bash
# The GPU checks in one run (CUDA): every test marked `gpu` (bf16 losses, generation, judge scoring, the online
# trainers on cuda: rloo, ppo, iterative dpo/cringe/sppo, nash-md, dro-v, paft, reward and preference
# models; tests/test_gpu.py, the packed-sequence check in tests/test_trainer.py and the token-level
# losses tdpo, cringe, nn in tests/test_trainer_token_level.py). Use where a
# device is lent. Only those three files are collected, so the run needs neither prefect nor
# datasets, only torch and transformers (all 32 passed in 57 s on an H200, 2026-11-27).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without installing the project
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_trainer.py tests/test_trainer_token_level.py --durations=10 "$@"
