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

STYLE = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "savefig.bbox": "tight",
    # Panels, their labels and a suptitle laid out without overlap.
    "figure.constrained_layout.use": True,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "font.size": 10,
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
