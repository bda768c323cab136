"""bnlib.experiments.covariate_shift: a tiny run through the runner, its record and figure."""
import json

from bnlib.experiments import load_results, run_experiment

TINY = dict(dataset="digits", steps=6, eval_every=3, widths=[8, 8])


def test_tiny_run_records_every_chunk_and_writes_its_figure(tmp_path):
    res = run_experiment("covariate_shift", profile="quick", device="cpu", seed=1,
                         out_dir=tmp_path, **TINY)
    m = res["metrics"]
    assert m["steps"] == [0, 3, 6]                     # before training, then every 3 steps
    for norm in ("no_bn", "bn"):
        assert len(m[norm]["test_accuracy"]) == 3 and len(m[norm]["percentiles"]) == 3
        assert all(lo <= mid <= hi for lo, mid, hi in m[norm]["percentiles"])
    stored = load_results(tmp_path / "covariate_shift-quick.json")
    assert stored["metrics"] == json.loads(json.dumps(m)) and stored["seed"] == 1
    assert res["figures"] == [str(tmp_path / "covariate_shift-quick-figure1.png")]
