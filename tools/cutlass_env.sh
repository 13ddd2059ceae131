# Sourced by the GPU scripts (from the repository root): the CUTLASS/CuTe headers from the
# nvidia-cutlass wheel carried in .whl/, when no CUTLASS_INCLUDE is set.
if [ -z "${CUTLASS_INCLUDE:-}" ] && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/nvidia_cutlass-*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
