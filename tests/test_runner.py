"""bnlib.experiments.runner: the contract, profiles, threads, seeds, results JSON, figure files.

A stand-in experiment module (registered for the test only) shows what the runner does around
any experiment; the real ones are checked against the contract.
"""
import json
import sys
import types

import matplotlib.pyplot as plt
import pytest
import torch

from bnlib.experiments import runner


def test_every_registered_experiment_keeps_the_contract():
    for name in runner.EXPERIMENTS:
        mod = runner.module(name)
        assert mod.NAME == name and mod.DESCRIPTION and set(mod.PROFILES) == {"quick", "full"}
        for profile in mod.PROFILES.values():
            assert profile["dataset"] in ("digits", "mnist1d")
        assert f"Book: book/experiments/{name}.ipynb" in mod.__doc__


def _stand_in(parts=("first", "second")):
    mod = types.ModuleType("stand_in_experiment")
    mod.NAME, mod.DESCRIPTION = "stand_in", "a stand-in"
    mod.PROFILES = {"quick": {"dataset": "digits", "n": 2}, "full": {"dataset": "digits", "n": 9}}

    def run(cfg, device, seed, progress):
        return {"threads": torch.get_num_threads(), "draw": torch.rand(()).item(), "n": cfg["n"]}

    def figures(results):
        out = {}
        for part in parts:
            fig, ax = plt.subplots()
            ax.plot([0, results["metrics"]["n"]])
            out[part] = fig
        return out

    mod.run, mod.figures = run, figures
    return mod


@pytest.fixture
def stand_in(monkeypatch):
    def register(**kw):
        mod = _stand_in(**kw)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(runner.EXPERIMENTS, "stand_in", mod.__name__)
        return mod
    return register


def test_the_runner_names_saves_and_closes_every_figure(stand_in, tmp_path):
    stand_in()
    open_before = plt.get_fignums()
    res = runner.run_experiment("stand_in", profile="full", device="cpu", out_dir=tmp_path)
    assert [p.split("/")[-1] for p in res["figures"]] == ["stand_in-full-first.png",
                                                          "stand_in-full-second.png"]
    for p in res["figures"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == open_before
    stored = json.loads((tmp_path / "stand_in-full.json").read_text())
    assert stored["metrics"]["n"] == 9 and stored["dataset"] == "digits"
    assert stored["experiment"] == "stand_in" and stored["profile"] == "full"
    assert stored["json_path"] == str(tmp_path / "stand_in-full.json")
    assert stored["device_name"].startswith("cpu")


def test_a_part_name_unfit_for_a_file_name_is_an_error(stand_in, tmp_path):
    stand_in(parts=("Bad Part",))
    open_before = plt.get_fignums()
    with pytest.raises(ValueError, match="parts made of"):
        runner.run_experiment("stand_in", profile="quick", device="cpu", out_dir=tmp_path)
    assert plt.get_fignums() == open_before


def test_a_module_without_the_contract_is_refused(stand_in):
    mod = stand_in()
    del mod.figures
    with pytest.raises(TypeError, match="figures"):
        runner.module("stand_in")


def test_threads_are_the_runners_on_every_device_and_restored(stand_in, monkeypatch):
    stand_in()
    before = torch.get_num_threads()
    monkeypatch.delenv("BNLIB_THREADS", raising=False)
    assert runner.run_experiment("stand_in", device="cpu")["metrics"]["threads"] == 1
    monkeypatch.setenv("BNLIB_THREADS", "2")
    assert runner.run_experiment("stand_in", device="cpu")["metrics"]["threads"] == 2
    assert torch.get_num_threads() == before
    monkeypatch.setenv("BNLIB_THREADS", "zero")
    with pytest.raises(ValueError, match="BNLIB_THREADS"):
        runner.run_experiment("stand_in", device="cpu")
    assert torch.get_num_threads() == before


def test_the_seed_fixes_the_run(stand_in):
    stand_in()
    draw = lambda seed: runner.run_experiment("stand_in", device="cpu", seed=seed)["metrics"]["draw"]  # noqa: E731
    assert draw(3) == draw(3) != draw(4)


def test_overrides_and_bad_arguments(stand_in, monkeypatch):
    stand_in()
    assert runner.run_experiment("stand_in", profile="quick", device="cpu", n=5)["config"]["n"] == 5
    with pytest.raises(ValueError, match="unknown settings"):
        runner.run_experiment("stand_in", profile="quick", device="cpu", no_such_setting=1)
    with pytest.raises(ValueError, match="profile"):
        runner.run_experiment("stand_in", profile="medium", device="cpu")
    with pytest.raises(ValueError, match="name must be one of"):
        runner.module("no_such_experiment")
    monkeypatch.setenv("BNLIB_PROFILE", "huge")
    with pytest.raises(ValueError, match="BNLIB_PROFILE"):
        runner.default_profile("cpu")
    monkeypatch.setenv("BNLIB_PROFILE", "full")
    assert runner.default_profile("cpu") == "full"
    monkeypatch.delenv("BNLIB_PROFILE")
    assert runner.default_profile("cpu") == "quick"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        runner.resolve_device("cuda")


def test_figure_path_names_profile_and_part(tmp_path):
    path = runner.figure_path(tmp_path, {"experiment": "x", "profile": "quick"}, "a_1")
    assert path == tmp_path / "x-quick-a_1.png"
