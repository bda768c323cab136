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
