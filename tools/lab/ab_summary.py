"""Summary of one tools/lab/ab_kernel.sh run: what ptxas warned of in each build, each version's
quick rows side by side, and the full sweeps against version a by class of rows (geometric means
of µs ratios).

    python3 tools/lab/ab_summary.py OUT_DIR      # the folder with run.log and bench-{a,b,..}.json
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import defaultdict

QUICK = re.compile(r"^b=(\d+)\s+s_q=(\d+) seqlen=(\d+)\s+h_q=(\d+)\s+(fix|var) ok=(\w+)\s+us=\s*([\d.]+)")


def quick_rows(run_log: str) -> dict[str, dict[tuple, list[float]]]:
    """version -> shape -> µs of each quick run, from the '== hh:mm:ss quick v (n)' blocks."""
    rows: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    version = None
    with open(run_log) as f:
        for line in f:
            head = re.match(r"^== \S+ (\w+) (\w)\b", line)
            if head:
                version = head.group(2) if head.group(1) == "quick" else None
                continue
            m = QUICK.match(line)
            if version and m:
                rows[version][m.groups()[:5]].append(float(m.group(7)))
    return rows


BUILD = re.compile(r"^== \S*/build-(\w+)\.log$")
PTXAS_BAD = re.compile(r"\(C75\d\d\)|[1-9]\d* bytes spill")


def ptxas_warnings(run_log: str) -> dict[str, list[str]]:
    """build (version + 0 plain / 1 measuring) -> its ptxas lines that cost speed: a C75xx warning
    (C7520: wgmma serialised) or a spill. ab_kernel.sh prints them under '== .../build-XN.log'."""
    found: dict[str, list[str]] = {}
    build = None
    with open(run_log) as f:
        for line in f:
            head = BUILD.match(line.strip())
            if head:
                build = head.group(1)
                found[build] = []
                continue
            if line.startswith("=="):
                build = None
            elif build and PTXAS_BAD.search(line):
                found[build].append(" ".join(line.split()[:14]))
    return found


def row_class(r: dict) -> str:
    if r["b"] < 128:
        return "small batches"
    return "b=128 h_q=128" if r["h_q"] == 128 else "b=128 other"


def main(out: str) -> None:
    log = os.path.join(out, "run.log")
    if os.path.exists(log):
        for build, lines in ptxas_warnings(log).items():
            print(f"ptxas, build {build}: " + ("clean (no C75xx warning, no spill)" if not lines else "WARNING"))
            for line in lines:
                print(f"  {line}")
        q = quick_rows(log)
        versions = sorted(q)
        if versions:
            print("quick bench, µs (each run):")
            print(f"  {'shape':<34}" + "".join(f"{v:>16}" for v in versions))
            for shape in q[versions[0]]:
                b, s_q, seqlen, h_q, kind = shape
                name = f"b={b} s_q={s_q} {seqlen} h_q={h_q} {kind}"
                cells = ", ".join
                print(f"  {name:<34}" + "".join(f"{cells(f'{x:.1f}' for x in q[v].get(shape, [])):>16}" for v in versions))
    sweeps = {}
    for name in sorted(os.listdir(out)):
        m = re.fullmatch(r"bench-(\w)\.json", name)
        if m:
            with open(os.path.join(out, name)) as f:
                sweeps[m.group(1)] = json.load(f)
    if "a" in sweeps and len(sweeps) > 1:
        print("full sweeps, µs / version a's, geometric mean by class (rows that passed their check):")
        base = {(r["b"], r["s_q"], r["seqlen"], r["h_q"], r["varlen"]): r for r in sweeps["a"]["rows"] if r["ok"]}
        for v, sweep in sweeps.items():
            if v == "a":
                continue
            ratios = defaultdict(list)
            for r in sweep["rows"]:
                a = base.get((r["b"], r["s_q"], r["seqlen"], r["h_q"], r["varlen"]))
                if a and r["ok"]:
                    ratios[row_class(r)].append(r["us"] / a["us"])
            summary = ", ".join(f"{c} {math.exp(sum(map(math.log, x)) / len(x)):.3f} ({len(x)} rows)"
                                for c, x in sorted(ratios.items()))
            print(f"  {v}: {summary}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")
