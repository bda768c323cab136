"""recorded_file: recorded results come from the checkout, or from the repository on Colab."""
import io
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bnlib.experiments import common

ROOT = Path(__file__).resolve().parents[1]


def test_repository_matches_the_book_config():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert (common.REPOSITORY, common.BRANCH) == (config["repository"]["url"],
                                                  config["repository"]["branch"])


def test_found_in_the_checkout_from_a_chapter_folder():
    found = common.recorded_file("bench/results/cpu.json", start=ROOT / "book" / "experiments")
    assert found == ROOT / "bench" / "results" / "cpu.json"


def test_absent_from_the_checkout_is_none_without_touching_the_network(monkeypatch):
    def no_network(url, timeout):
        raise AssertionError(f"fetched {url} from inside a checkout")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    start = ROOT / "book" / "experiments"
    assert common.recorded_file("book/results/no-such-run.json", start=start) is None


def test_downloaded_once_into_the_cache_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(b'{"ok": 1}')

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    for _ in range(2):
        path = common.recorded_file("bench/results/cuda.json", start=tmp_path)
        assert path.read_bytes() == b'{"ok": 1}'
    assert urls == ["https://raw.githubusercontent.com/bnbook/batchnorm-book/main/bench/results/cuda.json"]


def test_none_when_neither_has_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_network(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert common.recorded_file("bench/results/cuda.json", start=tmp_path) is None
    assert not (tmp_path / "home" / ".cache" / "bnlib" / "bench" / "results" / "cuda.json").exists()


def test_recorded_runs_list_their_figures_by_relative_paths_that_exist_and_name_the_profile():
    import json
    runs = sorted((ROOT / "book" / "results").glob("*-full.json"))
    assert len(runs) == 5  # one recorded full run per experiment chapter
    for path in runs:
        run = json.loads(path.read_text())
        assert run["json_path"] == f"book/results/{path.name}"
        assert run["figures"], path.name
        for fig in run["figures"]:
            # Relative to the repository, present, and named after the profile, so that a quick
            # run written to the same folder cannot overwrite a recorded full run's figure.
            assert not Path(fig).is_absolute() and (ROOT / fig).is_file(), fig
            assert Path(fig).name.startswith(f"{run['experiment']}-{run['profile']}"), fig


def test_quick_and_full_figures_have_different_names(tmp_path):
    import importlib
    import json

    from bnlib.experiments import EXPERIMENTS
    for name, module_name in EXPERIMENTS.items():
        run = json.loads((ROOT / "book" / "results" / f"{name}-full.json").read_text())
        plot = importlib.import_module(module_name).plot
        quick = plot({**run, "profile": "quick"}, tmp_path)
        full = plot(run, tmp_path)
        assert quick and full and not set(map(str, quick)) & set(map(str, full)), name
