#!/usr/bin/env bash
# The GPU checks in one run (CUDA): every test marked `gpu` (bf16 losses, generation, judge scoring, the online
# trainers on cuda: rloo, ppo, iterative dpo/cringe/sppo, nash-md, dro-v, paft, reward and preference
# models; tests/test_gpu.py, the packed-sequence check in tests/test_trainer.py and the token-level
# losses tdpo, cringe, nn in tests/test_trainer_token_level.py), and, where vLLM is installed
# (pip install 'alignflow[vllm]'; skipped without it), the real-engine checks of tests/test_gpu_vllm.py:
# log-prob parity with hf (eos included), release() freeing memory, weights reloaded in place, an
# online rloo run pushing the policy into the engine each step; then issue 16's GPU benchmark
# (tests/bench/bench_dpo_gpu.py: alignflow vs TRL DPO on a 0.5B Qwen2-shaped model, whole processes,
# peak GPU memory and our MFU; needs trl for the TRL side). Use where a device is lent. The
# first three files need neither prefect nor datasets, only torch and transformers (the first two's
# 32 tests passed in 57 s on an H200, 2026-11-27); the token-level and vLLM checks (written against
# vLLM 0.33.0) and the benchmark have not run on a GPU yet.
#   bash tests/gpu.sh [pytest args]      GPU_BENCH=0 skips the benchmark; GPU_BENCH_ARGS="--batch 16" tunes it
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without installing the project
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_trainer.py tests/test_trainer_token_level.py \
    tests/test_gpu_vllm.py --durations=10 "$@"
if [ "${GPU_BENCH:-1}" != "0" ]; then
  # shellcheck disable=SC2086
  python3 tests/bench/bench_dpo_gpu.py ${GPU_BENCH_ARGS:-}
fi
