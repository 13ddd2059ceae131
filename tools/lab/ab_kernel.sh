#!/usr/bin/env bash
# Two to four versions of the kernel side by side on one GPU, in one run: the machine's speed
# drifts by about 5% between runs, so versions are compared only within one.
#
# On any machine, first (the trees travel ready-made, so the GPU machine needs no git history):
#   rm -rf .ab && mkdir -p .ab/a .ab/b && (grep -qx '/.ab/' .git/info/exclude || echo /.ab/ >> .git/info/exclude)
#   git archive REV_A | tar -x -C .ab/a && git archive REV_B | tar -x -C .ab/b      # REV_B: a rev or the tree
#   (.ab/c, .ab/d likewise for a third and fourth version)
# Then, on the GPU machine, from the repository root (with .whl/ and .ab/ copied there):
#   bash tools/lab/ab_kernel.sh .ab/a .ab/b [.ab/c [.ab/d]]
#
# The first tree is the baseline A; the others are B, C, D. Builds every version plain, and those
# in TIMELINE (default "a b") also as the measuring build (TORCH_MLA_TIMELINE=1, when the tree has
# the timeline tool), all at once; then on the GPU, one step at a time: the GPU tests of B, C, D,
# the quick bench of A B C D then D C B A (the spread between the two runs of one version is the
# noise), the timelines (TIMELINE), compute-sanitizer memcheck and racecheck on B (the tests and
# sanitizer are tools/gpu_check.sh's steps, run with SKIP_BUILD=1 in that version's tree).
# STEPS="..." picks steps (default: tests quick timeline sanitize; also: bench, the full sweep of
# each version into bench-{a,b,..}.json, and decoder, the decoder's GPU tests on B). Every step has
# a time limit and a timestamp; logs go to $OUT: run.log (the quick rows too), build.log,
# timeline-{a,b,..}.json, bench-{a,b,..}.json and summary.txt (tools/lab/ab_summary.py: the quick
# rows side by side, and each sweep against A by class of rows).
# BENCH_ARGS="--dtype fp8" times the FP8 kernel in the quick and bench steps (its rows' us are the
# FP8 kernel's), and TIMELINE_ARGS=--fp8 gives the FP8 kernel's timeline.
set -o pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
[ $# -ge 2 ] && [ $# -le 4 ] || { echo "usage: $0 TREE_A TREE_B [TREE_C [TREE_D]]"; exit 2; }
names=(a b c d); V=(); declare -A SRC
for i in $(seq 0 $(( $# - 1 ))); do v=${names[$i]}; V+=($v); SRC[$v]=$(realpath "${@:$((i + 1)):1}") || exit 2; done
LAB=$(realpath "$(dirname "$0")"); TOOLS=$(dirname "$LAB")  # tools/lab, tools
# The timeline tool of a tree: tools/lab/timeline.py, or tools/timeline.py in trees older than tools/lab/.
timeline_of() { for f in tools/lab/timeline.py tools/timeline.py; do [ -f "$1/$f" ] && { echo "$f"; return; }; done; }
STEPS=${STEPS:-tests quick timeline sanitize}
TIMELINE=${TIMELINE-a b}  # the versions that also get the measuring build and a timeline step ("": none)
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader
  source "$TOOLS/cutlass_env.sh"
  W=/tmp/ab; rm -rf $W; mkdir -p $W
  pids=()
  for v in "${V[@]}"; do
    src=${SRC[$v]}
    for t in 0 1; do
      [ $t = 1 ] && { [[ " $TIMELINE " != *" $v "* ]] || [ -z "$(timeline_of "$src")" ]; } && continue
      mkdir -p $W/$v$t && cp -r "$src/." $W/$v$t
      (cd $W/$v$t && rm -rf build torch_mla/_C*.so && MAX_JOBS=4 NVCC_APPEND_FLAGS="-Xptxas -v" TORCH_MLA_TIMELINE=$t \
         timeout 400 python3 setup.py build_ext --inplace > $W/build-$v$t.log 2>&1; echo "build $v$t: rc=$?") &
      pids+=($!)
    done
  done
  t0=$(date +%s); wait "${pids[@]}"; echo "builds: $(( $(date +%s) - t0 )) s"  # never a bare wait: tee is a child too
  for log in $W/build-*.log; do echo "== $log"; grep -E "C75[0-9]{2}|spill" "$log" | sort | uniq -c | head -4; done
  cat $W/build-*.log > "$OUT/build.log"
  quick() { echo "== $(date +%T) quick $1 ($2)"; (cd $W/${1}0 && timeout 60 python3 -m torch_mla.bench --quick ${BENCH_ARGS:-} \
              2>&1 | grep -E "^(b=|device|[0-9]+ shapes)"); }
  for step in $STEPS; do
    case $step in
      tests) for v in "${V[@]:1}"; do
               echo "== $(date +%T) tests, $v"
               (cd $W/${v}0 && SKIP_BUILD=1 OUT=$W/check-$v timeout 240 bash "$TOOLS/gpu_check.sh" tests)
             done ;;
      bench) for v in "${V[@]}"; do  # the full sweep of every version, A first (about 100 s each)
               echo "== $(date +%T) bench $v"; (cd $W/${v}0 && timeout 300 python3 -m torch_mla.bench ${BENCH_ARGS:-} --json "$OUT/bench-$v.json" 2>&1 \
                 | grep -E "^(b=|device|[0-9]+ shapes)")
             done ;;
      decoder) echo "== $(date +%T) decoder, b"
               (cd $W/b0 && SKIP_BUILD=1 OUT=$W/check-b timeout 300 bash "$TOOLS/gpu_check.sh" decoder) ;;
      sanitize) echo "== $(date +%T) sanitize, b"
                (cd $W/b0 && SKIP_BUILD=1 OUT=$W/check-b timeout 400 bash "$TOOLS/gpu_check.sh" sanitize) ;;
      quick) for v in "${V[@]}"; do quick $v 1; done
             for i in $(seq $(( ${#V[@]} - 1 )) -1 0); do quick ${V[$i]} 2; done ;;
      timeline) for v in $TIMELINE; do
                  [ -d $W/${v}1 ] || continue
                  echo "== $(date +%T) timeline $v"; (cd $W/${v}1 && timeout 120 python3 "$(timeline_of .)" ${TIMELINE_ARGS:-} --json "$OUT/timeline-$v.json")
                done ;;
    esac
  done
  date -u
} 2>&1 | tee "$OUT/run.log"
python3 "$LAB/ab_summary.py" "$OUT" | tee "$OUT/summary.txt"  # quick rows side by side; sweeps against A
