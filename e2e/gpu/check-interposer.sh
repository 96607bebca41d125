#!/usr/bin/env bash
# Checks the interposer on a real GPU with PyTorch (see e2e/gpu/README.md).
#
#   e2e/gpu/check-interposer.sh [path/to/libtensor_fusion_interposer.so]
#
# Needs: an NVIDIA GPU with its driver, python3 with torch (CUDA build). Builds nothing and needs
# no network: build the library beforehand (cargo build --release -p tensor-fusion-interposer)
# and copy it to the machine. Takes about 3-5 minutes on an H200.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
library="${1:-${TF_INTERPOSER:-$here/../../target/release/libtensor_fusion_interposer.so}}"
if [[ ! -f "$library" ]]; then
    echo "interposer library not found: $library (build it with cargo build --release -p tensor-fusion-interposer)" >&2
    exit 2
fi
if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: this check needs an NVIDIA GPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, "cuda", torch.version.cuda)'

export TF_INTERPOSER="$(cd "$(dirname "$library")" && pwd)/$(basename "$library")"
export TF_LOG_LEVEL="${TF_LOG_LEVEL:-warn}"
exec timeout 600 python3 "$here/interposer_check.py"
