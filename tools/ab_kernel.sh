#!/usr/bin/env bash
# Two versions of the kernel side by side, in one device call (device time is the scarce thing).
#
# Here, first (the device machine's .git may be stale, so the trees travel ready-made):
#   rm -rf .ab && mkdir -p .ab/a .ab/b && (grep -qx '/.ab/' .git/info/exclude || echo /.ab/ >> .git/info/exclude)
#   git archive REV_A | tar -x -C .ab/a && git archive REV_B | tar -x -C .ab/b      # REV_B: a rev or the tree
# Then the device tool: run(command="bash tools/ab_kernel.sh .ab/a .ab/b", carry=[".whl", ".ab"]).
#
# Builds A and B, each plain and as the measuring build (TORCH_MLA_TIMELINE=1, when the tree has
# tools/timeline.py), all four at once; then on the GPU, one step at a time: B's GPU tests, the
# quick bench of A, B, B, A (the spread between the two runs of one version is the noise), each
# version's timeline, compute-sanitizer memcheck and racecheck on B (the tests and sanitizer are
# tools/gpu_check.sh's steps, run with SKIP_BUILD=1 in B's tree). STEPS="..." picks steps
# (default: tests quick timeline sanitize). Every step has a time limit and a timestamp; logs go
# to $OUT: run.log, build.log, quick-{a,b}{1,2}.json, timeline-{a,b}.json (8 files, the most the
# device tool brings back).
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
A=$(realpath "$1") || exit 2; B=$(realpath "$2") || exit 2
TOOLS=$(realpath "$(dirname "$0")")
STEPS=${STEPS:-tests quick timeline sanitize}
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
  source "$TOOLS/cutlass_env.sh"
  W=/tmp/ab; rm -rf $W; mkdir -p $W
  pids=()
  for v in a b; do
    src=$A; [ $v = b ] && src=$B
    for t in 0 1; do
      [ $t = 1 ] && [ ! -f "$src/tools/timeline.py" ] && continue
      mkdir -p $W/$v$t && cp -r "$src/." $W/$v$t
      (cd $W/$v$t && rm -rf build torch_mla/_C*.so && MAX_JOBS=4 NVCC_APPEND_FLAGS="-Xptxas -v" TORCH_MLA_TIMELINE=$t \
         timeout 400 python3 setup.py build_ext --inplace > $W/build-$v$t.log 2>&1; echo "build $v$t: rc=$?") &
      pids+=($!)
    done
  done
  t0=$(date +%s); wait "${pids[@]}"; echo "builds: $(( $(date +%s) - t0 )) s"  # never a bare wait: tee is a child too
  for log in $W/build-*.log; do echo "== $log"; grep -E "C75[0-9]{2}|spill" "$log" | sort | uniq -c | head -4; done
  cat $W/build-*.log > "$OUT/build.log"
  quick() { echo "== $(date +%T) quick $1 ($2)"; (cd $W/${1}0 && timeout 60 python3 -m torch_mla.bench --quick \
              --json "$OUT/quick-$1$2.json" 2>&1 | grep -E "^(b=|device|[0-9]+ shapes)"); }
  for step in $STEPS; do
    case $step in
      tests|sanitize) limit=240; [ $step = sanitize ] && limit=400
                      echo "== $(date +%T) $step, B"
                      (cd $W/b0 && SKIP_BUILD=1 OUT=$W/check timeout $limit bash "$TOOLS/gpu_check.sh" $step) ;;
      quick) quick a 1; quick b 1; quick b 2; quick a 2 ;;
      timeline) for v in a b; do
                  [ -d $W/${v}1 ] || continue
                  echo "== $(date +%T) timeline $v"; (cd $W/${v}1 && timeout 120 python3 tools/timeline.py --json "$OUT/timeline-$v.json")
                done ;;
    esac
  done
  date -u
} 2>&1 | tee "$OUT/run.log"
