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


def test_figure_has_at_most_two_panels_per_row_and_the_legend_in_its_own_slot():
    import matplotlib.pyplot as plt

    from bnlib.experiments.runner import draw
    res = run_experiment("covariate_shift", profile="quick", device="cpu", seed=1, **TINY)
    fig = draw(res)["figure1"]
    try:
        # Readable on a 390-px phone: a 2 x 2 grid, never a row of three.
        assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 2)}
        plotted = [ax for ax in fig.axes if ax.axison]
        legend_slot = [ax for ax in fig.axes if not ax.axison]
        assert len(plotted) == 3 and len(legend_slot) == 1
        # The slot's legend names both networks and all three percentiles.
        labels = [t.get_text() for t in legend_slot[0].get_legend().get_texts()]
        assert labels == ["without BN", "with BN", "15th percentile", "50th percentile",
                          "85th percentile"]
        # The two percentile panels share one scale, so that the bands compare by eye.
        assert plotted[0].get_ylim() == plotted[1].get_ylim()
    finally:
        plt.close(fig)
