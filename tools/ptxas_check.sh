#!/usr/bin/env bash
# Compile the kernels (csrc/**/*.cu) for sm_90a here (no GPU needed) and fail on what costs speed without
# changing results: a ptxas C75xx warning (C7520: wgmma serialised, which cost 25-30% once) or a
# register spill. Run it on every kernel variant before spending device time on it.
#
#   bash tools/ptxas_check.sh [TREE]            # TREE: a checkout (default: this one)
#   EXTRA=-DMLA_TIMELINE bash tools/ptxas_check.sh   # the measuring build
#
# Headers: $CUTLASS_INCLUDE, else the nvidia-cutlass wheel in .whl/ (tools/cutlass_env.sh, as for the
# GPU scripts), found where setup.py finds it.
set -euo pipefail
TREE=$(realpath "${1:-.}")
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
if [ -z "${CUTLASS_INCLUDE:-}" ]; then
  cd "$(dirname "$0")/.." && source tools/cutlass_env.sh
  CUTLASS_INCLUDE=$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))") \
    || { echo "no CUTLASS_INCLUDE, and no nvidia-cutlass wheel in .whl/ or installed"; exit 2; }
fi
log=$(mktemp)
for cu in $(cd "$TREE" && find csrc -name '*.cu' | sort); do  # every kernel, as setup.py builds them
  "$NVCC" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr --expt-extended-lambda \
    --use_fast_math -DNDEBUG ${EXTRA:-} -I"$TREE/csrc" -I"$CUTLASS_INCLUDE" -I"$CUDA_HOME/include/cccl" \
    -Xptxas -v -c "$TREE/$cu" -o /dev/null >> "$log" 2>&1 || { cat "$log"; exit 1; }
done
grep -A3 "Compiling entry function '.*decode_kernel" "$log" | grep -E "Used [0-9]+ registers" | sort | uniq -c || true
bad=$(grep -E "\(C75[0-9]{2}\)|[1-9][0-9]* bytes spill" "$log" | sed 's/ in the function.*//' | sort | uniq -c || true)
rm -f "$log"
if [ -n "$bad" ]; then echo "ptxas: $bad"; exit 1; fi
echo "ptxas: no C75xx warning, no spill"
