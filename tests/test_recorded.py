"""The recorded full-profile runs in book/results/: complete, named by profile and part, and
drawn by the current figures() exactly as stored."""
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from PIL import Image

from bnlib import plotting
from bnlib.experiments import EXPERIMENTS
from bnlib.experiments.runner import draw, figure_path

ROOT = Path(__file__).resolve().parents[1]
# The matplotlib that drew book/results/*.png. Another version renders text a little
# differently, so the byte-for-byte check below holds for this one; elsewhere the sizes must.
DRAWN_WITH = "3.11.2"


def test_one_recorded_run_per_experiment_with_relative_profile_named_figures():
    runs = sorted((ROOT / "book" / "results").glob("*-full.json"))
    assert [p.name for p in runs] == sorted(f"{name}-full.json" for name in EXPERIMENTS)
    for path in runs:
        run = json.loads(path.read_text())
        assert run["json_path"] == f"book/results/{path.name}"
        assert run["figures"], path.name
        for fig in run["figures"]:
            # Relative to the repository, present, and named after the profile, so that a quick
            # run written to the same folder cannot overwrite a recorded full run's figure.
            assert not Path(fig).is_absolute() and (ROOT / fig).is_file(), fig
            assert Path(fig).name.startswith(f"{run['experiment']}-{run['profile']}-"), fig


def test_recorded_figures_are_what_the_current_code_draws_from_the_json():
    # Every part the code draws is a stored file, and the stored PNG is the drawing byte for byte
    # (a change to a figure function must re-draw the recorded figures: runner.save_figures).
    for name in EXPERIMENTS:
        run = json.loads((ROOT / "book" / "results" / f"{name}-full.json").read_text())
        figs = draw(run)
        paths = [str(figure_path("book/results", run, part)) for part in figs]
        assert paths == run["figures"], name
        for part, fig in figs.items():
            drawn, stored = plotting.png(fig), (ROOT / figure_path("book/results", run, part))
            plt.close(fig)
            if matplotlib.__version__ == DRAWN_WITH:
                assert drawn == stored.read_bytes(), (name, part)
            else:
                import io
                assert Image.open(io.BytesIO(drawn)).size == Image.open(stored).size, (name, part)
