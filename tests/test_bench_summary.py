"""The benchmark's table and summary logic, on synthetic rows (no GPU, no timing).

A row holds each kernel's times; the ratio is FlashMLA µs / torch-mla µs (above 1: torch-mla
faster), on do_bench and on graph replay; the summary is the geometric mean per class of rows.
"""

import math

import pytest
import torch

from torch_mla import bench

CEILINGS = {"copy_GBps": 4000.0, "matmul_TFLOPs": 700.0}


def synthetic_row(b, s_q, h_q, ours_us, base_us=None, ours_graph=None, base_graph=None, seqlen=4096):
    total_kv = b * seqlen
    row = {"b": b, "s_q": s_q, "seqlen": seqlen, "h_q": h_q, "varlen": False, "causal": True, "dtype": "bfloat16",
           "total_kv": total_kv, "bytes": total_kv * 576 * 2, "flops": 2 * s_q * h_q * total_kv * 1088,
           "torch_mla": {"ok": True, "us": ours_us, "graph_us": ours_graph or ours_us}}
    if base_us is not None:
        row["flashmla"] = {"ok": True, "us": base_us, "graph_us": base_graph or base_us}
    bench.add_figures(row, CEILINGS)
    return row


def test_ratio_is_baseline_time_over_ours_on_both_timings():
    row = synthetic_row(128, 1, 128, ours_us=200.0, base_us=300.0, ours_graph=100.0, base_graph=90.0)
    assert row["ratio"] == pytest.approx(1.5)
    assert row["graph_ratio"] == pytest.approx(0.9)


def test_fractions_of_the_ceilings_follow_bytes_and_flops():
    row = synthetic_row(128, 2, 128, ours_us=1000.0)
    ours = row["torch_mla"]
    assert ours["GBps"] == pytest.approx(row["bytes"] / 1e-3 / 1e9)
    assert ours["frac_copy"] == pytest.approx(ours["GBps"] / 4000.0)
    assert ours["frac_matmul"] == pytest.approx(row["flops"] / 1e-3 / 1e12 / 700.0)
    assert "ratio" not in row


@pytest.mark.parametrize("b,s_q,h_q,cls", [
    (128, 1, 128, 0), (128, 2, 64, 0), (128, 1, 64, 1), (128, 2, 32, 1), (128, 1, 16, 1), (1, 1, 128, 2), (64, 1, 16, 2),
])
def test_rows_fall_in_their_class(b, s_q, h_q, cls):
    assert bench.row_class(synthetic_row(b, s_q, h_q, 10.0)) == bench.CLASSES[cls]


def test_summary_is_the_geometric_mean_per_class_and_skips_rows_without_baseline():
    rows = [synthetic_row(128, 1, 128, 100.0, 200.0), synthetic_row(128, 2, 128, 100.0, 50.0),  # 2 and 0.5
            synthetic_row(128, 1, 16, 100.0, 110.0),
            synthetic_row(1, 1, 16, 10.0, 30.0, ours_graph=10.0, base_graph=20.0),
            synthetic_row(8, 1, 128, 10.0)]  # no baseline: not counted
    s = bench.summarize(rows)
    compute, memory, small = (s[c] for c in bench.CLASSES)
    assert compute["rows"] == 2 and compute["ratio"]["geomean"] == pytest.approx(1.0)
    assert (compute["ratio"]["min"], compute["ratio"]["max"]) == (pytest.approx(0.5), pytest.approx(2.0))
    assert memory["rows"] == 1 and memory["ratio"]["geomean"] == pytest.approx(1.1)
    assert small["rows"] == 1 and small["graph_ratio"]["geomean"] == pytest.approx(2.0)
    lines = bench.format_summary(s)
    assert len(lines) == 3 and "geomean 1.000" in lines[0]


def test_summary_is_empty_without_a_baseline():
    assert bench.summarize([synthetic_row(128, 1, 16, 100.0)]) == {}


def test_a_row_prints_both_kernels_and_the_ratio_only_with_a_baseline():
    with_base = bench.format_row(synthetic_row(128, 1, 128, 200.0, 300.0))
    assert with_base.startswith("b=128 s_q=1 seqlen=4096  h_q=128 fix ok=True  us=   200.0")
    assert "flashmla ok=True" in with_base and "us=   300.0" in with_base and "x=1.50" in with_base
    alone = bench.format_row(synthetic_row(128, 1, 128, 200.0))
    assert "flashmla" not in alone and "x=" not in alone


def test_geomean_of_reciprocals_is_the_reciprocal():
    xs = [0.5, 2.0, 1.3, 0.77]
    assert bench._geomean(xs) * bench._geomean([1 / x for x in xs]) == pytest.approx(1.0)
    assert bench._geomean([4.0, 1.0]) == pytest.approx(2.0)
    assert math.isclose(bench._geomean([3.0]), 3.0)


def test_cli_mistakes_are_one_line_errors(capsys):
    for argv in (["--dtype", "fp32"], ["--baseline", "cutlass"], ["--quick", "--small"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m torch_mla.bench: error:"), err


def test_dtype_list_takes_both_kinds():
    assert bench._dtype_list("bf16,fp16") == ["bf16", "fp16"]


def test_without_a_gpu_the_sweep_says_so_and_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_markdown_table_has_a_line_per_row_and_the_summary(tmp_path, capsys):
    import json

    rows = [synthetic_row(128, 1, 128, 100.0, 200.0), synthetic_row(1, 1, 16, 10.0)]
    run = {"device": "GPU X", "date": "2026-12-01 10:00 UTC", "commit": "abc1234", "torch": "2.11", "ceilings": CEILINGS,
           "rows": rows}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    assert bench.main(["--table", str(path)]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| 128") or line.startswith("| 1 ")]
    assert len(table) == 2
    assert "| 200.0 | 100.0 | 2.00 |" in table[0]
    assert table[1].count("| - ") == 5  # no baseline on that row: its five FlashMLA cells are dashes
    assert "GPU X, 2026-12-01 10:00 UTC, torch-mla abc1234" in text
    assert "| compute-bound (b=128, h_q*s_q >= 128) | 1 | 2.000 (2.00-2.00)" in text


def test_table_of_a_file_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(SystemExit) as e:
        bench.main(["--table", str(path)])
    assert e.value.code == 2
    assert "not a benchmark JSON" in capsys.readouterr().err


def fp8_row(b, s_q, h_q, fp8_us, bf16_us, base_us=None):
    row = synthetic_row(b, s_q, h_q, fp8_us, base_us)
    row["dtype"] = "fp8"
    row["torch_mla_bf16"] = {"ok": True, "us": bf16_us, "graph_us": bf16_us}
    bench.add_figures(row, CEILINGS)
    return row


def test_fp8_rows_give_the_speedup_over_our_bf16_and_stay_out_of_the_flashmla_summary(tmp_path, capsys):
    import json

    rows = [fp8_row(128, 1, 16, 100.0, 150.0, 160.0), fp8_row(128, 1, 32, 100.0, 600.0, 100.0),
            synthetic_row(128, 1, 16, 100.0, 90.0)]
    assert rows[0]["fp8_speedup"] == 1.5 and rows[0]["ratio"] == 1.6
    fp8 = bench.summarize_fp8(rows)
    cls = bench.CLASSES[1]
    assert fp8[cls]["rows"] == 2 and math.isclose(fp8[cls]["fp8_speedup"]["geomean"], 3.0)
    assert bench.summarize(rows)[cls]["rows"] == 1  # the bf16 row only
    run = {"device": "GPU X", "date": "d", "commit": "c", "torch": "t", "ceilings": CEILINGS, "rows": rows}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    assert bench.main(["--table", str(path)]) == 0
    text = capsys.readouterr().out
    assert "| 128 | 1 | 4096 | 16 | fixed | 100.0 | 150.0 | 1.50 | 160.0 | 1.60 |" in text
    assert f"| {cls} | 2 | 3.000 (1.50-6.00)" in text


def test_the_check_compares_the_shortest_and_longest_sequences_then_a_seeded_draw():
    lens = torch.tensor([50, 3, 900, 40, 3, 7, 900, 12, 60, 61])
    idx = bench.checked_sequences(lens, count=6, seed=4)
    assert idx.tolist()[:2] == [1, 2]  # the first shortest, the first longest
    assert len(set(idx.tolist())) == 6 and torch.equal(idx, bench.checked_sequences(lens, count=6, seed=4))
    assert not torch.equal(bench.checked_sequences(lens, count=10, seed=4), bench.checked_sequences(lens, count=10, seed=5))
    assert sorted(bench.checked_sequences(lens, count=20).tolist()) == list(range(10))  # never more than there are
    assert bench.checked_sequences(torch.tensor([5, 5]), count=8).tolist() == [0, 1]  # shortest = longest
