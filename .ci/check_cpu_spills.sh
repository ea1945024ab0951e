#!/usr/bin/env bash
# Fails where the register-tiled GEMM of the SIMD CPU builds (gemm_columns_impl, float
# and double: the input GEMM, the fused backward's dh, the weight gradients) reads or
# writes vector registers on the stack. Its 6 x 4 tile keeps 24 accumulators in the
# AVX-512 build's 32 registers; once g++ put them on the stack and AVX-512 training
# ran 1.3-2x slower (PERF_LOG.md row 60), unseen where only AVX2 CPUs ran the suite.
# Needs objdump (binutils) and fused_lstm importable (or the object to check as $1):
#   bash .ci/check_cpu_spills.sh
set -euo pipefail
PY=${PYTHON:-python}
SO=${1:-$(cd "${TMPDIR:-/tmp}" && "$PY" -c "import importlib.util; print(importlib.util.find_spec('fused_lstm._C').origin)")}
# Per function: how many packed float/double instructions (vmovaps, vfmadd231pd, ...)
# take a ymm/zmm register to or from the stack. (g++ also parks integers in xmm
# registers and broadcasts loop bounds from the stack: not counted.)
COUNTS=$(objdump -d --no-show-raw-insn -C "$SO" | awk '
  /^[0-9a-f]+ </ { name = $0; keep = name ~ /::(avx2|avx512)::.*gemm_columns_impl<(float|double), (true|false)>/ }
  keep && $2 ~ /^v[a-z0-9]*p[sd]$/ && /[yz]mm[0-9]+/ && /\(%rsp\)/ { bad[name]++ }
  keep { seen[name] = 1 }
  END { for (n in seen) print (n in bad ? bad[n] : 0), n }')
echo "$COUNTS" | sed 's/^/check_cpu_spills: /'
FUNCTIONS=$(echo "$COUNTS" | grep -c . || true)
if [ "$FUNCTIONS" -lt 8 ]; then
  echo "check_cpu_spills: expected gemm_columns_impl for 2 builds x 2 types x 2 layouts, found $FUNCTIONS" >&2
  exit 1
fi
if echo "$COUNTS" | grep -qv "^0 "; then
  echo "check_cpu_spills: gemm_columns_impl keeps vector registers on the stack (above)" >&2
  exit 1
fi
