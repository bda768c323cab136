"""bnlib.chapter: tables, recorded files (checkout or fetched), an experiment chapter's runs and
figures."""
import io
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from bnlib import chapter

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "book" / "experiments"


# --- tables ------------------------------------------------------------------------------------

def test_table_formats_floats_escapes_html_and_aligns_text():
    t = chapter.table([("a<b", 0.123456, 3, None)], ["name", "x", "n", "empty"], fmt=".3g",
                      caption="Caption")
    assert t.rows == [["a<b", "0.123", "3", ""]]
    assert "<td>a&lt;b</td>" in t._repr_html_() and "<caption>Caption</caption>" in t._repr_html_()
    assert repr(t).splitlines() == ["Caption", "name  x      n  empty", "----  -----  -  -----",
                                    "a<b   0.123  3"]
    with pytest.raises(ValueError, match=r"rows\[0\] has 1 cells, header has 2"):
        chapter.table([(1,)], ["a", "b"])


# --- recorded files ----------------------------------------------------------------------------

def test_repository_matches_the_book_config():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert (chapter.REPOSITORY, chapter.BRANCH) == (config["repository"]["url"],
                                                    config["repository"]["branch"])


def test_found_in_the_checkout_from_a_chapter_folder():
    found = chapter.recorded_file("bench/results/cpu.json", start=CHAPTERS)
    assert found == ROOT / "bench" / "results" / "cpu.json"


def test_absent_from_the_checkout_is_none_without_touching_the_network(monkeypatch):
    def no_network(url, timeout):
        raise AssertionError(f"fetched {url} from inside a checkout")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert chapter.recorded_file("book/results/no-such-run.json", start=CHAPTERS) is None


def test_downloaded_once_into_bnlibs_cache_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_CACHE_DIR", str(tmp_path / "cache"))
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(b'{"ok": 1}')

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    for _ in range(2):
        path = chapter.recorded_file("bench/results/cuda.json", start=tmp_path)
        assert path == tmp_path / "cache" / "bench" / "results" / "cuda.json"
        assert path.read_bytes() == b'{"ok": 1}'
    assert urls == ["https://raw.githubusercontent.com/bnbook/batchnorm-book/main/bench/results/cuda.json"]


def test_none_when_neither_has_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLIB_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert chapter.recorded_file("bench/results/cuda.json", start=tmp_path) is None
    assert not (tmp_path / "cache").exists()


# --- an experiment chapter's runs and figures ----------------------------------------------------

def test_recorded_run_and_its_absence(monkeypatch):
    full = chapter.recorded_run("variance_correction", start=CHAPTERS)
    assert full["experiment"] == "variance_correction" and full["profile"] == "full"
    assert chapter.recorded_run("variance_correction", profile="quick", start=CHAPTERS) is None
    with pytest.raises(ValueError, match="name must be one of"):
        chapter.recorded_run("no_such_experiment")


def test_runs_list_the_live_run_then_the_recorded_one():
    live = {"profile": "quick", "experiment": "x"}
    full = chapter.recorded_run("gradients", start=CHAPTERS)
    runs = chapter.Runs("gradients", live, full)
    assert [label for label, _ in runs] == ["live quick", f"recorded full, {full['device_name']}"]
    assert runs.live is live and runs.recorded is full
    assert repr(runs).startswith(f"Recorded full-profile run: {full['device_name']}")
    alone = chapter.Runs("gradients", live, None)
    assert list(alone) == [("live quick", live)] and alone.recorded is None
    assert "No recorded full-profile run (book/results/gradients-full.json" in repr(alone)


def test_figure_is_one_part_as_png_and_leaves_no_figure_open():
    full = chapter.recorded_run("noisy_bn", start=CHAPTERS)
    open_before = plt.get_fignums()
    pic = chapter.figure(full, "probes")
    assert pic._repr_png_().startswith(b"\x89PNG\r\n\x1a\n")
    assert repr(pic) == "<figure noisy_bn-full-probes>"
    assert plt.get_fignums() == open_before
    with pytest.raises(ValueError, match=r"part must be one of \['training', 'probes'\]"):
        chapter.figure(full, "nope")
    assert plt.get_fignums() == open_before


def test_show_displays_every_part_in_order(monkeypatch):
    import IPython.display
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(repr(obj)))
    chapter.show(chapter.recorded_run("variance_correction", start=CHAPTERS))
    assert shown == ["<figure variance_correction-full-simulation>",
                     "<figure variance_correction-full-second_moment>",
                     "<figure variance_correction-full-accuracy>"]


def test_experiment_runs_runs_live_with_overrides(monkeypatch):
    monkeypatch.delenv("BNLIB_PROFILE", raising=False)
    monkeypatch.chdir(CHAPTERS)
    runs = chapter.experiment_runs("variance_correction", sim_batch_sizes=[2], sim_trials=50,
                                   batch_sizes=[2], width=4, depth=1, steps=2)
    assert runs.live["config"]["sim_trials"] == 50 and runs.live["seed"] == 0
    assert runs.recorded["profile"] == "full" and len(runs) == 2
