#!/usr/bin/env bash
# The GPU checks in one run (bf16, CUDA): every test marked `gpu`. Use where a device is lent.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu tests "$@"
