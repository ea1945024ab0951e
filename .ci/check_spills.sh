#!/usr/bin/env bash
# Compiles the persistent kernels (csrc/cuda/persistent.cu) for sm_80 and sm_90 with
# ptxas' resource report and fails on any register spill or stack frame in them: a
# spilled accumulator tile would put the per-step loop on local memory. Needs nvcc and
# a CUDA build of torch in the running Python:  bash .ci/check_spills.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python}
INCLUDES=$("$PY" - <<'PY'
import glob, importlib.util, os
from torch.utils.cpp_extension import include_paths
dirs = include_paths(device_type="cuda")
spec = importlib.util.find_spec("nvidia")  # the nvidia-* wheels' headers (cuBLAS, ...)
for root in (spec.submodule_search_locations if spec else []):
    dirs += glob.glob(os.path.join(root, "*", "include"))
print(" ".join("-I" + d for d in dirs))
PY
)
REPORT=$(mktemp)
for arch in 80 90; do
  # shellcheck disable=SC2086
  "$CUDA_HOME/bin/nvcc" -std=c++20 -O3 -gencode "arch=compute_$arch,code=sm_$arch" \
    --expt-relaxed-constexpr -DFUSED_LSTM_WITH_CUDA -Icsrc $INCLUDES --resource-usage -Xptxas -warn-spills \
    -c csrc/cuda/persistent.cu -o /dev/null 2>&1 | tee -a "$REPORT" | grep -A2 "persistent_kernel" || true
done
# ptxas reports per function: "N bytes stack frame, N bytes spill stores, N bytes spill loads".
BAD=$(grep -A2 "Function properties for .*persistent_kernel" "$REPORT" |
      grep -E "[1-9][0-9]* bytes (stack frame|spill stores|spill loads)" || true)
KERNELS=$(grep -c "Function properties for .*persistent_kernel" "$REPORT" || true)
rm -f "$REPORT"
if [ "$KERNELS" -lt 12 ]; then
  echo "check_spills: expected reports for 3 dtypes (float, half, bfloat16) x 2 kernels x 2 architectures, got $KERNELS" >&2
  exit 1
fi
if [ -n "$BAD" ]; then
  echo "check_spills: the persistent kernels spill or use a stack frame:" >&2
  echo "$BAD" >&2
  exit 1
fi
echo "check_spills: $KERNELS persistent kernel builds, no spills, no stack frame"
