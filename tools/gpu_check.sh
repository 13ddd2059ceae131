#!/usr/bin/env bash
# Build the CUDA extension on a GPU machine, then check and time it; logs go to $OUT (or ./gpu-out).
# Usage: tools/gpu_check.sh [tests] [quick|bench] [sanitize] [decoder]
# Needs the nvidia-cutlass wheel (CUTLASS/CuTe headers) in .whl/ when no CUTLASS_INCLUDE is set.
# SKIP_BUILD=1: run the steps on the extension already built in the current folder
# (tools/lab/ab_kernel.sh builds its trees itself, then runs this script's steps in them).
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if [ "${SKIP_BUILD:-0}" = 0 ]; then
  source "$(dirname "$0")/cutlass_env.sh"
  rm -rf build torch_mla/_C*.so  # a clean build: a changed header alone must not be missed
  t0=$(date +%s)
  # -Xptxas -v: registers, spills and the C75xx warnings (wgmma serialised) reach the log only with it.
  NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v" python3 setup.py build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"; grep -E "C75[0-9]{2}|registers|spill" "$OUT/build.log" | sort | uniq -c | head
fi
python3 -c "import torch_mla, torch; assert torch_mla.has_cuda_kernel(), torch_mla.cuda_kernel_error(); print(torch.cuda.get_device_name())" || exit 1
so=$(ls torch_mla/_C*.so | head -1)
cuobjdump -sass "$so" 2>/dev/null | grep -oE "HGMMA\.[0-9x]+\.F32\.[A-Z0-9]+|HMMA\.[0-9]+" | sort | uniq -c
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -x tests/test_cuda_decode.py tests/test_cuda_fp8.py tests/test_cuda_validation.py \
            tests/test_cuda_graph_pattern.py tests/test_flash_mla_compat.py tests/test_cli.py -m gpu 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    quick) python3 -m torch_mla.bench --quick --json "$OUT/quick.json" 2>&1 | tee "$OUT/quick.log" ;;
    bench) python3 -m torch_mla.bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 300 compute-sanitizer --tool $tool python3 -m pytest -q -x tests/test_cuda_decode.py tests/test_cuda_fp8.py \
          -k "dtypes_and_softmax_scale or metadata_from_get_metadata or write_cache_then_decode or fp8_write_cache" 2>&1 \
          | tee "$OUT/sanitize-$tool.log" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" ;
      done ;;
    decoder) python3 -m pytest -q tests/test_model_gpu.py tests/test_model_compile.py 2>&1 | tee "$OUT/decoder.log" | tail -3 ;;
  esac
done
