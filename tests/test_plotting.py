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


def test_text_reads_on_a_phone_and_fits_the_desktop_column():
    # A one-panel figure is about the desktop column's width (~690 px): shown at ~100 %.
    px = plotting.WIDTH * plotting.DPI
    assert 650 <= px <= 760, px
    # On a 390-px phone the column is ~360 px: a font of F pt shows at F * DPI / 72 * 360 / px px.
    # 9 px is the smallest text we count as readable there (the issue-12 figures showed ~4-6 px).
    for key in ("font.size", "axes.labelsize", "axes.titlesize", "xtick.labelsize",
                "ytick.labelsize", "legend.fontsize"):
        shown = plotting.STYLE[key] * plotting.DPI / 72 * 360 / px
        assert shown >= 9, (key, shown)


def test_panels_at_most_two_per_row_stacked_in_rows():
    fig, axes = plotting.panels(3)
    assert len(axes) == 3 and len(fig.axes) == 3          # the empty fourth slot is removed
    cols = {round(ax.get_position().x0, 3) for ax in axes}
    rows = {round(ax.get_position().y0, 3) for ax in axes}
    assert len(cols) == 2 and len(rows) == 2, (cols, rows)
    assert fig.get_size_inches()[0] == pytest.approx(plotting.panel_figsize(2, 2)[0])
    plt.close(fig)
    fig, axes = plotting.panels(1)
    assert tuple(fig.get_size_inches()) == pytest.approx((plotting.WIDTH, plotting.HEIGHT))
    plt.close(fig)
    with pytest.raises(ValueError, match="ncols must be at most 2"):
        plotting.panel_figsize(3)
    with pytest.raises(ValueError, match="n must be a positive int"):
        plotting.panels(0)
