#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, torch and nvcc, from the repo root:
#   bash .ci/gpu_check.sh OUT_DIR
# 1. builds the extension (MAX_JOBS from nproc, for this GPU's architecture),
# 2. runs the CUDA tests, 3. runs compute-sanitizer memcheck on a small forward
# and backward, 4. checks the persistent kernels (tests, then memcheck, racecheck and
# synccheck), 5. runs the CUDA benchmark against cuDNN, per-step path and persistent
# kernels, and the per-step latency (fused_lstm.bench.step_latency). Logs and a summary
# table go to OUT_DIR, seventeen files at most (summary.md, twelve logs, each
# benchmark's results.json and speedup.png). It changes no setting of the card.
# Each step has a time limit (seconds: BUILD_S, CUDA_TESTS_S, MEMCHECK_S,
# PERSISTENT_TESTS_S, SANITIZER_S (each tool), LATENCY_S, BENCH_S (each), CPU_TESTS_S;
# 0 skips the step)
# so one hung step cannot eat a short GPU lease;
# BENCH_DTYPES picks the benchmark's dtypes.
set -uo pipefail
OUT=${1:?usage: bash .ci/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.md"
WORK=$(mktemp -d)

step() {  # step NAME LOG LIMIT_S COMMAND...
  local name=$1 log=$2 limit=$3; shift 3
  local start=$SECONDS
  echo "== $name" >&2
  if [ "$limit" = 0 ]; then printf '| %s | skipped | 0 |\n' "$name" >> "$SUMMARY"; return; fi
  if timeout "$limit" "$@" > "$OUT/$log" 2>&1; then result=ok
  else rc=$?; result="FAILED ($rc$([ $rc = 124 ] && echo ", over ${limit} s"))"; fi
  printf '| %s | %s | %d |\n' "$name" "$result" $((SECONDS - start)) >> "$SUMMARY"
  tail -n 3 "$OUT/$log" >&2
}

{
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  nvcc --version | tail -n 1
  echo '```'
  printf '\n| step | result | seconds |\n|---|---|---|\n'
} > "$SUMMARY" 2>&1
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)

# PIP_BREAK_SYSTEM_PACKAGES: the machine's Python may be marked externally managed.
step build build.log "${BUILD_S:-300}" env FORCE_CUDA=1 MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" PIP_BREAK_SYSTEM_PACKAGES=1 \
  "$PY" -m pip install --no-build-isolation --no-deps -v .
# From a folder outside the checkout, so the installed package is the one tested;
# with pytest-xdist where installed (a crashing test then loses only its worker).
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
# The CUDA tests: test_cuda.py, and the reference grids' CUDA cases (test_lstm.py), all
# marked `cuda`.
step cuda-tests cuda_tests.log "${CUDA_TESTS_S:-360}" env -C /tmp "$PY" -m pytest -q -rs $XDIST -m cuda \
  -k "not persistent and not graph_capture" "$PWD/tests/test_cuda.py" "$PWD/tests/test_lstm.py"
cat > "$WORK/memcheck_case.py" <<'PY'
import torch, fused_lstm
from torch.nn.utils.rnn import pack_padded_sequence
for dtype in (torch.float32, torch.float16):
    m = fused_lstm.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=4).to("cuda", dtype)
    x = torch.randn(6, 5, 8, device="cuda", dtype=dtype, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 5, 1, 3]), enforce_sorted=False)
    out, (h, c) = m(packed)
    (out.data.float().sum() + h.float().sum() + c.float().sum()).backward()
torch.cuda.synchronize()
print("memcheck case ran")
PY
step memcheck memcheck.log "${MEMCHECK_S:-180}" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" "$WORK/memcheck_case.py"
# The persistent kernels (off by default until these pass): both settings against
# float64 truth over the H x B grid, packed, reverse, bidirectional, a bit-identical
# rerun, CUDA graph capture; then compute-sanitizer's memcheck, racecheck and synccheck
# on one mode A (one block) and one mode B (a cluster of 8) layer, forward and backward.
step persistent-tests persistent_tests.log "${PERSISTENT_TESTS_S:-240}" env -C /tmp "$PY" -m pytest -q -rs $XDIST -m cuda \
  -k "persistent or graph_capture" "$PWD/tests/test_cuda.py"
cat > "$WORK/persistent_case.py" <<'PY'
import torch, fused_lstm
torch.ops.fused_lstm.set_cuda_persistent("on")
from torch.nn.utils.rnn import pack_padded_sequence
for H in (64, 256):  # one block; a cluster of 8 (float32)
    m = fused_lstm.LSTM(8, H, bidirectional=True).cuda()
    x = torch.randn(6, 11, 8, device="cuda", requires_grad=True)
    out, (h, c) = m(pack_padded_sequence(x, torch.tensor([6, 2, 5, 1, 3, 6, 6, 4, 4, 2, 1]), enforce_sorted=False))
    (out.data.sum() + h.sum() + c.sum()).backward()
torch.cuda.synchronize()
print("persistent launches:", torch.ops.fused_lstm.cuda_persistent_launches())
assert torch.ops.fused_lstm.cuda_persistent_launches() == 8
PY
for tool in memcheck racecheck synccheck; do
  step "persistent-$tool" "persistent_$tool.log" "${SANITIZER_S:-120}" compute-sanitizer --tool $tool --error-exitcode 1 "$PY" "$WORK/persistent_case.py"
done
step step-latency step_latency.log "${LATENCY_S:-120}" env -C /tmp "$PY" -m fused_lstm.bench.step_latency
step benchmark benchmark.log "${BENCH_S:-300}" env -C /tmp "$PY" -m fused_lstm.benchmark --device cuda \
  --suite quick --dtype "${BENCH_DTYPES:-float32,bfloat16,float16}" --out "$OUT"
# The same with the persistent kernels on (results in OUT_DIR/persistent).
step benchmark-persistent benchmark_persistent.log "${BENCH_S:-300}" env -C /tmp FUSED_LSTM_CUDA_PERSISTENT=on \
  "$PY" -m fused_lstm.benchmark --device cuda --suite quick --dtype "${BENCH_DTYPES:-float32,bfloat16,float16}" \
  --out "$OUT/persistent"
# Last: CI runs these too, without a GPU; here they check the CUDA build's CPU path.
step cpu-tests cpu_tests.log "${CPU_TESTS_S:-240}" env -C /tmp OMP_NUM_THREADS=2 "$PY" -m pytest -q -x $XDIST -m "not cuda" \
  "$PWD/tests" --ignore="$PWD/tests/test_cuda.py" --ignore="$PWD/tests/test_benchmark.py"
rm -rf "$WORK"
cat "$SUMMARY"
! grep -q FAILED "$SUMMARY"
