"""python -m bnlib.experiments (bnlib/experiments/__main__.py): help, bad names, files written."""
import pytest

from bnlib.experiments import EXPERIMENTS
from bnlib.experiments.__main__ import main


def test_help_lists_every_experiment_with_its_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    from bnlib.experiments import describe
    for name in EXPERIMENTS:
        assert name in text and describe(name) in text


def test_rejects_an_unknown_experiment():
    with pytest.raises(SystemExit) as exit_:
        main(["no_such_experiment"])
    assert exit_.value.code != 0


def test_writes_results_and_named_figures(tmp_path, monkeypatch, capsys):
    from bnlib.experiments import covariate_shift
    tiny = {**covariate_shift.PROFILES["quick"], "dataset": "digits", "steps": 6,
            "eval_every": 3, "widths": [8, 8]}
    monkeypatch.setitem(covariate_shift.PROFILES, "quick", tiny)
    main(["covariate_shift", "--profile", "quick", "--device", "cpu", "--out", str(tmp_path),
          "--no-progress"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["covariate_shift-quick-figure1.png",
                                                          "covariate_shift-quick.json"]
    err = capsys.readouterr().err
    assert "wrote" in err and "covariate_shift-quick-figure1.png" in err
