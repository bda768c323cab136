"""One matplotlib style for every figure in the book: PNG, labelled axes, fixed colours per variant.

Library code draws under `style()` (a context: nothing global changes); a chapter that draws
its own figures calls `use_style()` once.
"""
import contextlib

import matplotlib
import matplotlib.pyplot as plt

# One colour per variant, the same in every chapter.
COLORS = {
    "bn": "#1f77b4",          # with Batch Normalization
    "no_bn": "#d62728",       # without
    "noisy_bn": "#2ca02c",    # BN followed by injected noise (Santurkar et al.)
    "reference": "#7f7f7f",   # a theoretical or paper value
}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

# Sizes for the book's column. The page's text column is about 690 px wide at a 1280-px window and
# about 360 px on a 390-px phone; an image wider than the column is scaled down to fit it.
# A one-panel figure is WIDTH inches at savefig.dpi, i.e. about 700 px: shown at ~100 % on desktop.
# On a phone the same image is scaled by about 360 / 700, so a font of F points (F * DPI / 72 px)
# shows at about 5 * F / WIDTH px: F = 13 and WIDTH = 5.4 give ~12 px (a little less in practice:
# the figure element's margins leave the image ~335 px), tick labels and legends (12 pt) ~11 px.
# The issue-12 figures were 10 pt on 10-13 in: ~4-6 px on a phone.
WIDTH = 5.4          # inches, one panel (the default figure)
HEIGHT = 3.7         # inches, one row of panels
DPI = 128            # savefig.dpi: WIDTH * DPI ~ the desktop column in px
MAX_COLS = 2         # panels per row: more would shrink every label below readable on a phone
PANEL_WIDTH = 3.5    # inches per panel in a two-panel row (7.0 in: ~75 % on desktop, ~9 px text on a phone)
FONT = 13

STYLE = {
    "figure.figsize": (WIDTH, HEIGHT),
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    # Panels, their labels and a suptitle laid out without overlap.
    "figure.constrained_layout.use": True,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "font.size": FONT,
    "axes.titlesize": FONT,
    "axes.labelsize": FONT,
    "figure.titlesize": FONT + 1,
    "xtick.labelsize": FONT - 1,
    "ytick.labelsize": FONT - 1,
    "legend.fontsize": FONT - 1,
    "legend.title_fontsize": FONT - 1,
    "legend.handlelength": 1.6,
    "lines.linewidth": 2.0,
    "lines.markersize": 6.5,
    # PNG only: nbval does not compare PNG, and SVG would embed varying ids.
    "figure.max_open_warning": 0,
}


@contextlib.contextmanager
def style():
    """The book's style within the block only (matplotlib's rcParams restored after it)."""
    with plt.rc_context(STYLE):
        yield


def use_style():
    """Apply the book's style globally: for chapters, never called by bnlib itself."""
    plt.rcParams.update(STYLE)
    try:  # inline figures in notebooks as PNG
        from matplotlib_inline.backend_inline import set_matplotlib_formats
        set_matplotlib_formats("png")
    except ImportError:
        pass


def subplots(nrows=1, ncols=1, **kwargs):
    """plt.subplots under the book's style."""
    with style():
        return plt.subplots(nrows, ncols, **kwargs)


def panel_figsize(ncols=1, nrows=1):
    """(width, height) in inches for nrows x ncols panels in the book's column (ncols <= MAX_COLS)."""
    for name, v in (("ncols", ncols), ("nrows", nrows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if ncols > MAX_COLS:
        raise ValueError(f"ncols must be at most {MAX_COLS} (panels per row readable on a 390-px "
                         f"phone), got {ncols}: stack the panels or split the figure into parts")
    width = WIDTH if ncols == 1 else PANEL_WIDTH * ncols
    return (width, HEIGHT * nrows if ncols == 1 else 0.9 * HEIGHT * nrows)


def panels(n, ncols=MAX_COLS, **kwargs):
    """n panels, at most ncols (<= 2) per row, stacked in rows: (fig, [ax, ...]) with n axes.

    Sized for the book's column (panel_figsize). For a phone, one panel per figure (a figure part
    each, beside its paragraph) reads best; two per row are the most that stay legible.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (number of panels), got {n!r}")
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    kwargs.setdefault("figsize", panel_figsize(ncols, nrows))
    fig, axes = subplots(nrows, ncols, squeeze=False, **kwargs)
    flat = list(axes.flat)
    for ax in flat[n:]:  # an odd count leaves one empty slot in the last row
        ax.remove()
    return fig, flat[:n]


def label(ax, xlabel, ylabel, title=None):
    """Every axis gets a label (with units where there are any)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def save(fig, path):
    """Save as PNG (the only figure format the book uses) and return the path."""
    path = str(path)
    if not path.endswith(".png"):
        raise ValueError(f"path must end in .png (figures are PNG), got {path!r}")
    with style():  # the style's savefig settings, also outside a chapter
        fig.savefig(path, format="png", metadata={"Software": None})
    return path


def png(fig):
    """The figure as PNG bytes, exactly as save() writes it."""
    import io
    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def ticks_at(ax, values):
    """Put log-axis x ticks at the given values, labelled plainly, with no minor tick labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
