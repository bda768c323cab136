"""What the book's chapters share: result tables (HTML on the page, plain text for nbval),
files recorded in the repository (read from the checkout, or fetched on Colab), and an
experiment chapter's runs: the live one, the recorded full run, and their figures part by part.

An experiment chapter's set-up is one call, `runs = experiment_runs(NAME)`; a figure is
`figure(runs.recorded, "part")`, the last expression of a cell (whose myst-nb metadata can
give it a caption), and `show(results)` displays every part of one run.
"""
import html
import numbers
from pathlib import Path


def _cell(v, fmt):
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
        return format(v, fmt)
    return "" if v is None else str(v)


class Table:
    """A small results table: shown as HTML in the book, compared as plain text by nbval.

    rows are sequences of cells; float cells are formatted with `fmt` (a format spec, e.g. ".3g")
    unless already strings. `caption` is shown above the table.
    """

    def __init__(self, rows, header, fmt=".4g", caption=None):
        self.header = [str(h) for h in header]
        self.rows = [[_cell(v, fmt) for v in row] for row in rows]
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(f"rows[{i}] has {len(row)} cells, header has {len(self.header)}")
        self.caption = caption

    def _repr_html_(self):
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        cap = f"<caption>{esc(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="bnlib-table">{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")

    def __repr__(self):
        cols = [self.header] + self.rows
        widths = [max(len(r[j]) for r in cols) for j in range(len(self.header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(([self.caption] if self.caption else []) + lines)


def table(rows, header, fmt=".4g", caption=None):
    """A Table (see there): the last expression of a cell, or passed to display()."""
    return Table(rows, header, fmt=fmt, caption=caption)


# --- files recorded in the repository ---------------------------------------------------------

# The book's repository (the same as _config.yml's; tests/test_chapter.py checks it).
REPOSITORY, BRANCH = "https://github.com/bnbook/batchnorm-book", "main"


def _checkout_root(start):
    """The book's repository root at or above `start` (it has _toc.yml and bnlib/), or None."""
    for folder in (Path(start).resolve(), *Path(start).resolve().parents):
        if (folder / "_toc.yml").is_file() and (folder / "bnlib").is_dir():
            return folder
    return None


def recorded_file(relpath, start="."):
    """A file recorded in the repository, e.g. "bench/results/cpu.json" or "book/results/X.json".

    Inside a checkout (the book build, CI, a clone) it is read from there, and a file the
    checkout lacks is simply absent: None, with no network access. Elsewhere (Colab installs
    only bnlib) it is downloaded once from the repository into bnlib.cache_dir(). Returns its
    Path, or None where it cannot be had.
    """
    root = _checkout_root(start)
    if root is not None:
        return root / relpath if (root / relpath).is_file() else None
    from bnlib import cache_dir
    cached = cache_dir() / relpath
    if not cached.is_file():
        import urllib.error
        import urllib.request
        url = REPOSITORY.replace("github.com", "raw.githubusercontent.com") + f"/{BRANCH}/{relpath}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
        except (urllib.error.URLError, OSError):
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(data)
    return cached


# --- an experiment chapter's runs ---------------------------------------------------------------

def live_run(name, profile=None, **overrides):
    """Run experiment `name` here: the profile from $BNLIB_PROFILE, else full on CUDA and quick
    on CPU; seed 0, no progress bar, no files written. overrides change its configuration."""
    from bnlib.experiments.runner import run_experiment
    return run_experiment(name, profile=profile, device="auto", seed=0, progress=False,
                          **overrides)


def recorded_run(name, profile="full", start="."):
    """The run of `name` recorded in book/results/NAME-PROFILE.json (see recorded_file), or None."""
    from bnlib.experiments.runner import EXPERIMENTS, load_results
    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    path = recorded_file(f"book/results/{name}-{profile}.json", start=start)
    return None if path is None else load_results(path)


class Runs(list):
    """The runs a chapter shows, as (label, results) pairs: the live run, then the recorded
    full run where there is one. .live and .recorded (None when absent) give each directly.
    Its repr says where the recorded run comes from, or that there is none."""

    def __init__(self, name, live, recorded):
        pairs = [(f"live {live['profile']}", live)]
        if recorded is not None:
            pairs.append((f"recorded {recorded['profile']}, {recorded['device_name']}", recorded))
        super().__init__(pairs)
        self.name, self.live, self.recorded = name, live, recorded

    def __repr__(self):
        r = self.recorded
        if r is None:
            return (f"No recorded full-profile run (book/results/{self.name}-full.json not found): "
                    "only the live run is shown.")
        return (f"Recorded {r['profile']}-profile run: {r['device_name']} (torch "
                f"{r['torch_version']}), dataset {r['config']['dataset']}, {r['wall_time_s']:.0f} s.")


def experiment_runs(name, **overrides):
    """An experiment chapter's set-up in one call: run `name` live (see live_run) and load its
    recorded full run (see recorded_run). Returns Runs."""
    return Runs(name, live_run(name, **overrides), recorded_run(name))


class Picture:
    """One figure as PNG bytes: a notebook shows the image (myst-nb puts the caption from the
    cell's metadata under it); its text form names the figure."""

    def __init__(self, png, name):
        self.png, self.name = png, name

    def _repr_png_(self):
        return self.png

    def __repr__(self):
        return f"<figure {self.name}>"


def _pictures(results, parts=None):
    import matplotlib.pyplot as plt
    from bnlib import plotting
    from bnlib.experiments.runner import draw
    figs = draw(results)
    unknown = [p for p in parts or () if p not in figs]
    try:
        if unknown:
            raise ValueError(f"part must be one of {list(figs)} for {results['experiment']}, "
                             f"got {unknown[0]!r}")
        name = f"{results['experiment']}-{results['profile']}"
        return {p: Picture(plotting.png(f), f"{name}-{p}") for p, f in figs.items()
                if parts is None or p in parts}
    finally:
        for f in figs.values():
            plt.close(f)


def figure(results, part):
    """One part of one run's figures (results as run_experiment returns it), drawn under the
    book's style, as a Picture: the last expression of a cell displays it."""
    return _pictures(results, [part])[part]


def show(results, parts=None):
    """Display the figures of one run, every part in order (or only `parts`)."""
    from IPython.display import display
    for picture in _pictures(results, parts).values():
        display(picture)
