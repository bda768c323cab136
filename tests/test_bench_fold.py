"""bench/fold.py: the precision sweep shows the cancellation it is built to show, and a quick run
writes its JSON with the speed ratios."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # bench/ is run from the root

from bench import fold  # noqa: E402


def test_precision_follows_the_condition_number():
    rows = [r for r in fold.precision_rows(quick=True) if r["dtype"] == "float32"]
    for r in rows:
        # The unfolded float32 layer rounds z ~ |mu| (relative u): the output z - mu, of size
        # std, is off by about u * |mu| / std. The factor 10 either way covers the sums' few
        # roundings (growing like sqrt(fan-in) = 8.5 at worst, partly cancelling).
        predicted = r["unit_roundoff"] * r["mean_over_std"]
        assert predicted / 10 < r["unfolded"] < predicted * 10, r
        if r["mean_from"] == "input":   # the data cancel: folding cannot help
            assert predicted / 10 < r["bnlib_fold"] < predicted * 10, r
        else:                           # b - mu cancels in the float64 fold: a few roundings
            assert r["bnlib_fold"] < 10 * r["unit_roundoff"], r
    assert max(r["mean_over_std"] for r in rows) > 1e4   # the sweep reaches the bad cases


def test_quick_run_writes_results(tmp_path):
    out = tmp_path / "fold.json"
    assert fold.main(["--quick", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["meta"]["torch"] and saved["meta"]["device"] == "cpu"
    speed = saved["speed"]
    assert set(speed["speedup_over_unfolded"]) == {"unfolded", "bnlib_fold", "torch_fx_fuse"}
    assert speed["speedup_over_unfolded"]["unfolded"] == 1.0
    # The folded nets compute the same function: float32 differences of a few roundings of
    # outputs of size ~10 (1e-4 is far above that, far below a wrong fold's O(1)).
    assert all(d < 1e-4 for d in speed["max_abs_diff_to_unfolded"].values())
