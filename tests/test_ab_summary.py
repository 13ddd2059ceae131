"""tools/lab/ab_summary.py reads an ab_kernel.sh log right (CPU: a synthetic run.log).

A build's ptxas lines that cost speed (a C75xx warning, a nonzero spill) are reported under that
build and no other; the zero-spill lines every build prints are not; quick rows go to the version
whose block they follow.
"""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "lab" / "ab_summary.py"
_spec = importlib.util.spec_from_file_location("ab_summary", _PATH)
ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab)

C7520 = ("      2 ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are "
         "serialized due to program dependence on compiler-inserted WG.AR in divergent path in the function 'k'")
CLEAN = "     15     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
SPILL = "      2     16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads"
ROW = ("b=128 s_q=1 seqlen=4096  h_q=128 fix ok=True  us=   {us} graph_us=   300.0 GB/s=  2000 TFLOP/s=  480 "
       "copy%=  50 mm%=  70 flashmla_us=266.0 x=0.89 graph_x=0.89")


def test_ptxas_warnings_and_quick_rows_land_under_their_build_and_version(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "build a0: rc=0", "builds: 25 s",
        "== /tmp/ab/build-a0.log", CLEAN,
        "== /tmp/ab/build-b0.log", CLEAN, C7520,
        "== /tmp/ab/build-b1.log", SPILL,
        "== 08:55:01 tests, b", "58 passed",  # a later block: a C75 line here would not be a build's
        C7520,
        "== 08:55:28 quick a (1)", ROW.format(us=301.5),
        "== 08:55:34 quick b (1)", ROW.format(us=299.0),
        "== 08:55:40 quick b (2)", ROW.format(us=298.0),
        "== 08:55:46 quick a (2)", ROW.format(us=302.5),
    ]) + "\n")
    found = ab.ptxas_warnings(str(log))
    assert found["a0"] == []
    assert len(found["b0"]) == 1 and "(C7520)" in found["b0"][0]
    assert len(found["b1"]) == 1 and "4 bytes spill" in found["b1"][0]
    assert set(found) == {"a0", "b0", "b1"}
    rows = ab.quick_rows(str(log))
    shape = ("128", "1", "4096", "128", "fix")
    assert rows["a"][shape] == [301.5, 302.5]
    assert rows["b"][shape] == [299.0, 298.0]
