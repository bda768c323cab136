"""python -m bnlib.experiments (bnlib/experiments/__main__.py): help, bad names, files written."""
import json

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
          "--no-progress", "--set", "steps=9"])
    assert json.loads((tmp_path / "covariate_shift-quick.json").read_text())["config"]["steps"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["covariate_shift-quick-figure1.png",
                                                          "covariate_shift-quick.json"]
    err = capsys.readouterr().err
    assert "wrote" in err and "covariate_shift-quick-figure1.png" in err


def test_set_replaces_a_setting_and_rejects_unknown_or_malformed_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sync_bn", "--set", "ranks_per_node=4", "--out", str(tmp_path)])
    assert "has no setting ['ranks_per_node']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sync_bn", "--set", "world_sizes=[2,", "--out", str(tmp_path)])
    assert "VALUE must be JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sync_bn", "--set", "world_sizes", "--out", str(tmp_path)])
    assert "KEY=VALUE" in capsys.readouterr().err
