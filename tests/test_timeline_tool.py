"""tools/lab/timeline.py reads the measuring build's event clocks right (CPU: a synthetic buffer).

Each phase is the difference of its two named events, in µs by the CTA's own clock rate
(globaltimer ns over clock64 cycles across the CTA's life); events never written (-1), CTAs
with too few pages and tiles past the shape's tile count take no part.
"""

import argparse
import importlib.util
import pathlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "lab" / "timeline.py"
_spec = importlib.util.spec_from_file_location("timeline_tool", _PATH)
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)

START = 10_000  # clock64 at the CTA's start


def synthetic(pages, period, offsets, ghz, ctas=((0, 0),)):
    """Page g's event e at START + g * period + offsets[e] clocks, for the given (part, tile)s."""
    buf = torch.full((tl.PARTS, tl.TILES, tl.ROWS, tl.EVENTS), -1, dtype=torch.int64)
    life = pages * period + max(offsets)
    for part, tile in ctas:
        h = buf[part, tile, 0]
        h[tl.START_CLOCK], h[tl.END_CLOCK] = START, START + life
        h[tl.START_NS], h[tl.END_NS] = 123_456, 123_456 + round(life / ghz)
        h[tl.PAGES_DONE] = pages
        for g in range(pages):
            buf[part, tile, g + 1] = torch.tensor([START + g * period + o for o in offsets])
    return buf


@settings(max_examples=30, deadline=None)
@given(pages=st.integers(5, tl.ROWS - 1), period=st.integers(1_000, 20_000), ghz=st.sampled_from([1.0, 1.755, 1.98]),
       steps=st.lists(st.integers(1, 100), min_size=tl.EVENTS, max_size=tl.EVENTS))
def test_phases_are_event_differences_in_microseconds(pages, period, ghz, steps):
    offsets = [sum(steps[: e + 1]) for e in range(tl.EVENTS)]  # increasing, all within a period
    got = tl.analyse(synthetic(pages, period, offsets, ghz), tiles=1)["summary_us"]
    us = lambda clocks: clocks / ghz / 1e3
    tol = dict(rel=1e-3, abs=1e-6)  # the ns of the header are rounded to whole ns
    assert got["period (S issue to next S issue)"] == pytest.approx(us(period), **tol)
    assert got["S = Q K^T"] == pytest.approx(us(offsets[tl.S_DONE] - offsets[tl.S_ISSUE]), **tol)
    assert got["P.V (WG1)"] == pytest.approx(us(offsets[tl.PV_DONE] - offsets[tl.PV_ISSUE]), **tol)
    assert got["refill issued -> S of that page issued"] == pytest.approx(
        us(2 * period + offsets[tl.S_ISSUE] - offsets[tl.REFILL]), **tol)


def test_the_fp8_kernels_refill_comes_back_three_pages_on():
    offsets = [10 * (e + 1) for e in range(tl.EVENTS)]
    got = tl.analyse(synthetic(40, 2_000, offsets, 1.0), tiles=1, phases=tl.phases_for(fp8=True))["summary_us"]
    assert "refill issued -> S of that page issued" not in got
    assert got["refill issued -> S of that page issued (3 stages)"] == pytest.approx(
        (3 * 2_000 + offsets[tl.S_ISSUE] - offsets[tl.REFILL]) / 1e3)
    assert tl.phases_for(fp8=False) == tl.PHASES


def test_the_fp8_narrow_forms_refill_comes_back_four_pages_on():
    offsets = [10 * (e + 1) for e in range(tl.EVENTS)]
    assert (tl.fp8_stages(16), tl.fp8_stages(32), tl.fp8_stages(33), tl.fp8_stages(256)) == (4, 4, 3, 3)
    got = tl.analyse(synthetic(40, 2_000, offsets, 1.0), tiles=1, phases=tl.phases_for(True, tl.fp8_stages(16)))
    assert got["summary_us"]["refill issued -> S of that page issued (4 stages)"] == pytest.approx(
        (4 * 2_000 + offsets[tl.S_ISSUE] - offsets[tl.REFILL]) / 1e3)


def test_a_bad_shape_is_one_line_not_a_traceback():
    assert tl.shape_arg("128,1,8192,16") == (128, 1, 8192, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="B,S_Q,SEQLEN,H_Q"):
        tl.shape_arg("128,1,8192")


def test_unwritten_events_and_short_or_extra_ctas_take_no_part():
    offsets = [10 * (e + 1) for e in range(tl.EVENTS)]
    buf = synthetic(40, 2_000, offsets, 1.0, ctas=((0, 0), (1, 0), (2, 1)))
    buf[0, 0, 1:, tl.PV_DONE] = -1  # never written in CTA (0, 0)
    buf[1, 0, 10, tl.PV_DONE] += 5_000  # one odd page in CTA (1, 0): the median ignores it
    buf[3, 0, 0, tl.START_CLOCK] = START  # a CTA with a start but no end
    result = tl.analyse(buf, tiles=1)
    assert [(c["part"], c["tile"]) for c in result["ctas"]] == [(0, 0), (1, 0)]  # tile 1 is past the shape's tiles
    assert result["summary_us"]["P.V (WG1)"] == pytest.approx((offsets[tl.PV_DONE] - offsets[tl.PV_ISSUE]) / 1e3)
    few = synthetic(2, 2_000, offsets, 1.0)  # the first two pages of a stretch are left out: nothing remains
    assert tl.analyse(few, tiles=1)["ctas"] == []


def test_a_stretch_longer_than_the_buffer_is_traced_up_to_its_last_row():
    # A CTA may walk more pages than the buffer has rows (the kernel writes none past them).
    offsets = [10 * (e + 1) for e in range(tl.EVENTS)]
    buf = synthetic(tl.ROWS - 1, 2_000, offsets, 1.0)
    buf[0, 0, 0, tl.PAGES_DONE] = 3 * tl.ROWS
    result = tl.analyse(buf, tiles=1)
    assert result["ctas"][0]["pages"] == 3 * tl.ROWS and len(result["ctas"][0]["events_us"]) == tl.ROWS - 1
    assert result["summary_us"]["period (S issue to next S issue)"] == pytest.approx(2.0)
