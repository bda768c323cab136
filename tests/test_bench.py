"""The benchmark harness: byte counting, ratios and targets on made-up records, and a smoke run."""
import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a top-level package run as `python -m bench` from the repository root; pytest does
# not put the root on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench.timing  # noqa: E402
from bench import report  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.cases import SHAPES_2D, SHAPES_4D, Case, bytes_needed, cases  # noqa: E402
from bench.run import _record, run_numpy_case, run_torch_case  # noqa: E402
from bench.timing import (MIN_SAMPLE_SECONDS, calls_per_sample, saved_extra_bytes,  # noqa: E402
                          time_calls)
from bnlib import _cpu_kernel  # noqa: E402
from bnlib import functional as BF  # noqa: E402


def test_bytes_needed_counts_tensors_of_x():
    case = Case((100, 500))                       # 50,000 float32 values = 200,000 bytes
    assert bytes_needed(case, "forward") == 3 * 200_000          # read x twice, write y
    assert bytes_needed(case, "backward") == 5 * 200_000         # x, dy twice; write dx
    assert bytes_needed(case, "forward+backward") == 8 * 200_000
    assert bytes_needed(Case((8, 4, 2, 2), "channels_last", "bfloat16"), "forward") == 3 * 128 * 2
    with pytest.raises(ValueError, match="pass_name"):
        bytes_needed(case, "sideways")


def test_cases_span_the_issue_shapes_and_layouts():
    full = cases()
    names = [c.name for c in full]
    assert SHAPES_2D[0] == (100, 500) and SHAPES_2D[-1] == (65536, 1024)
    for s in SHAPES_4D:
        assert {c.layout for c in full if c.shape == s} == {"contiguous", "channels_last"}
    assert "NHWC 64x64x56x56 float32" in names and "2D 100x500 float32" in names
    assert all(c.numel * c.itemsize < 2**24 for c in cases(quick=True))  # quick stays small


def test_record_bandwidth_is_bytes_over_time():
    r = _record(Case((100, 500)), "cpu", "torch", "bnlib", "forward", 1e-3, 5, 0)
    assert r["bandwidth_gbs"] == pytest.approx(600_000 / 1e-3 / 1e9)


def _fake(case, impl, pass_name, seconds, library="torch"):
    return _record(case, "cpu", library, impl, pass_name, seconds, 3, 0)


def test_ratios_and_targets_from_made_up_times():
    small, big = Case((100, 500)), Case((1024, 1024))
    records = [_fake(small, "native", "forward+backward", 1.0),
               _fake(small, "bnlib", "forward+backward", 1.2),     # within 1.25x
               _fake(big, "native", "forward+backward", 2.0),
               _fake(big, "bnlib", "forward+backward", 2.6),       # 1.3x: missed
               _fake(small, "reference_compact", "backward", 1.0, "numpy"),
               _fake(small, "reference_staged", "backward", 1.9, "numpy"),   # 1.9x: under 2x
               _fake(big, "reference_compact", "backward", 1.0, "numpy"),
               _fake(big, "reference_staged", "backward", 1.1, "numpy")]
    report.add_ratios(records, copy_bytes_per_s=1e9)
    assert records[1]["ratio_to_native"] == pytest.approx(1.2)
    assert records[3]["ratio_to_native"] == pytest.approx(1.3)
    assert records[4]["speedup_over_staged"] == pytest.approx(1.9)
    assert records[1]["fraction_of_copy"] == pytest.approx(records[1]["bandwidth_gbs"])
    met = {(t["target"], t["case"]): t["met"] for t in report.check_targets(records)}
    assert met == {("cpu bnlib fwd+bwd / native", small.name): True,
                   ("cpu bnlib fwd+bwd / native", big.name): False,
                   ("numpy staged / compact backward", small.name): False,
                   ("numpy compact faster than staged", small.name): True,
                   ("numpy compact faster than staged", big.name): True}
    with pytest.raises(ValueError, match="baseline_seconds"):
        report.ratio(1.0, 0.0)


class FakeClock:
    """A clock that advances only when a timed function says it took `seconds`."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def take(self, seconds):
        self.now += seconds


# The timer runs on a fake clock here: real sleeps overshoot on a loaded machine (a CI run saw a
# 0.5 ms sleep measured long enough to halve the calls per sample), and these tests check the
# timer's logic, not the machine's scheduler.
@pytest.fixture
def fake_clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(bench.timing, "clock", fake)
    return fake


def test_time_calls_interleaves_and_rejects_no_repeats(fake_clock):
    calls = []

    def slow(name):  # slower than a sample's minimum, so one call per sample
        return lambda: (calls.append(name), fake_clock.take(1.5 * MIN_SAMPLE_SECONDS))

    time_calls([slow("a"), slow("b")], repeats=2, warmup=1)
    # warm-up a, b; the calls that size the samples, a, b; then a b; then b a
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a"]
    with pytest.raises(ValueError, match="repeats"):
        time_calls([lambda: None], repeats=0)


def test_short_calls_are_repeated_within_a_sample_and_timed_per_call(fake_clock):
    assert calls_per_sample(1.0) == 1 and calls_per_sample(0.0) == 1
    assert calls_per_sample(MIN_SAMPLE_SECONDS / 4) == 4
    calls, durations = [], iter([9.0, 0.5e-3] + [0.5e-3, 0.5e-3, 0.5e-3, 1.3e-3] * 3)

    def fn():
        calls.append(1)
        fake_clock.take(next(durations))

    (t,) = time_calls([fn], repeats=3, warmup=1)
    # 1 warm-up (its 9 s is not timed) + 1 sizing call (0.5 ms: 4 per 2 ms sample) + 3 samples of 4
    assert len(calls) == 2 + 3 * 4
    # Per call, not per sample: each sample is 2.8 ms over 4 calls.
    assert t == pytest.approx(2.8e-3 / 4)


def test_time_calls_on_the_real_clock_returns_a_positive_time_per_call():
    (t,) = time_calls([lambda: sum(range(1000))], repeats=3, warmup=1)
    assert 0 < t < 1.0


def test_saved_extra_bytes_sees_full_size_saves_but_not_inputs():
    x = torch.randn(64, 8, requires_grad=True)
    # bnlib saves x (an input: free), the weight, and per-channel mean and invstd: 2 * 8 floats.
    assert saved_extra_bytes(lambda x: BF.batch_norm(x, None, None, training=True), [x]) == 64
    # exp saves its full-size result: 64 * 8 floats that are not an input.
    assert saved_extra_bytes(lambda x: (x * 2).exp(), [x]) == 64 * 8 * 4


def test_one_tiny_case_runs_for_torch_and_numpy():
    case = Case((16, 4, 3, 3), "channels_last")
    recs = run_torch_case(case, "cpu", repeats=1, warmup=0)
    # Through the compiled kernel where it is built, and then the composed path is timed too.
    kernel = _cpu_kernel.status() == "loaded"
    impls = ("native", "bnlib") + (("bnlib_composed",) if kernel else ())
    assert {(r["impl"], r["pass"]) for r in recs} == {
        (i, p) for i in impls for p in ("forward", "forward+backward")}
    assert {r["path"] for r in recs if r["impl"] == "bnlib"} == {
        "cpu kernel" if kernel else "composed"}
    assert all(r["median_s"] > 0 and r["saved_extra_bytes"] == 2 * 4 * 4 for r in recs)
    recs = run_numpy_case(Case((16, 4)), repeats=1, warmup=0)
    assert [r["impl"] for r in recs] == ["reference", "reference_compact", "reference_staged"]
    assert recs[0]["saved_extra_bytes"] >= 16 * 4 * 4    # the NumPy cache keeps x_hat


def test_main_quick_writes_json_and_plot(tmp_path, capsys):
    assert main(["--quick", "--only", "2D 100x500", "--repeats", "1",
                 "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert result["device"] == "cpu" and result["torch_threads"] == 1 and result["quick"]
    assert {r["case"] for r in result["records"]} == {"2D 100x500 float32"}
    # native, bnlib (and bnlib_composed where the kernel takes the case) x 2 passes + 3 NumPy.
    kernel = result["cpu_kernel"]["status"] == "loaded"
    assert len(result["records"]) == (9 if kernel else 7) and len(result["targets"]) == 3
    assert (tmp_path / "cpu-quick.png").stat().st_size > 0
    assert "2D 100x500 float32" in capsys.readouterr().out
