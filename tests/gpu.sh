#!/usr/bin/env bash
# The GPU checks in one run (CUDA): every test marked `gpu` (bf16 losses, generation, judge scoring, the online
# trainers on cuda: rloo, ppo, iterative dpo/cringe/sppo, nash-md, dro-v, paft, reward and preference
# models; tests/test_gpu.py, the packed-sequence check in tests/test_trainer.py and the token-level
# losses tdpo, cringe, nn in tests/test_trainer_token_level.py), and, where vLLM is installed
# (pip install 'alignflow[vllm]'; skipped without it), the real-engine checks of tests/test_gpu_vllm.py:
# log-prob parity with hf (eos included), release() freeing memory, weights reloaded in place, an
# online rloo run pushing the policy into the engine each step. Use where a device is lent. The
# first three files need neither prefect nor datasets, only torch and transformers (the first two's
# 32 tests passed in 57 s on an H200, 2026-11-27); the token-level and vLLM checks (written against
# vLLM 0.33.0) have not run on a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without installing the project
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_trainer.py tests/test_trainer_token_level.py \
    tests/test_gpu_vllm.py --durations=10 "$@"
