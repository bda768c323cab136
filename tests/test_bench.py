"""The benchmark harness: byte counting, ratios and targets on made-up records, and a smoke run."""
import json
import sys
from pathlib import Path

import pytest
import torch

# bench/ is a top-level package run as `python -m bench` from the repository root; pytest does
# not put the root on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.cases import SHAPES_2D, SHAPES_4D, Case, bytes_needed, cases  # noqa: E402
from bench.run import _record, run_numpy_case, run_torch_case  # noqa: E402
from bnlib import kernels  # noqa: E402


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


def test_one_tiny_case_runs_for_torch_and_numpy():
    case = Case((16, 4, 3, 3), "channels_last")
    recs = run_torch_case(case, "cpu", repeats=1, warmup=0)
    # Through the compiled kernel where it is built, and then the composed path is timed too.
    kernel = kernels.status("cpu") == "loaded"
    impls = ("native", "bnlib") + (("bnlib_composed",) if kernel else ())
    assert {(r["impl"], r["pass"]) for r in recs} == {
        (i, p) for i in impls for p in ("forward", "forward+backward")}
    assert {r["path"] for r in recs if r["impl"] == "bnlib"} == {
        "cpu" if kernel else "composed"}
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
