"""bnlib.plotting: the style applied locally (library code leaves rcParams alone), PNG only."""
import matplotlib
import matplotlib.pyplot as plt
import pytest

from bnlib import plotting
from bnlib.chapter import recorded_run
from bnlib.experiments.runner import draw


def test_style_is_local_to_its_block():
    before = dict(matplotlib.rcParams)
    with plotting.style():
        assert matplotlib.rcParams["legend.frameon"] is False
    assert dict(matplotlib.rcParams) == before


def test_drawing_every_recorded_run_changes_no_global_setting():
    from bnlib.experiments import EXPERIMENTS
    before = dict(matplotlib.rcParams)
    for name in EXPERIMENTS:
        figs = draw(recorded_run(name, start="book/experiments"))
        for fig in figs.values():
            # drawn under the style: e.g. frameless legends, whatever the global setting
            for legend in [ax.get_legend() for ax in fig.axes] + fig.legends:
                if legend is not None:
                    assert not legend.get_frame_on(), name
            plt.close(fig)
    assert dict(matplotlib.rcParams) == before


def test_save_is_png_only(tmp_path):
    fig, ax = plotting.subplots()
    with pytest.raises(ValueError, match="must end in .png"):
        plotting.save(fig, tmp_path / "x.svg")
    path = plotting.save(fig, tmp_path / "x.png")
    assert open(path, "rb").read() == plotting.png(fig)    # the same bytes either way
    plt.close(fig)
