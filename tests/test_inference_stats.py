"""bnlib.experiments.inference_stats: the depth probe by hand, the fixed-network sweep, tiny runs."""
import json

import pytest
import torch

from bnlib.experiments import inference_stats as ist
from bnlib.experiments import run_experiment
from bnlib.experiments.models import bn_layers, mlp
from bnlib.nn import BatchNorm1d

TINY = dict(dataset="digits", width=8, depth=2, steps=20, lr_change_step=10, eval_every=5,
            batch_size=8, batch_sizes=[2, 8], sweep_steps=5, deep_depth=3, deep_steps=5,
            deep_eval_batch=4)


def test_forward_both_has_no_gap_when_running_stats_equal_the_batch_stats():
    torch.manual_seed(0)
    model = mlp(3, [3, 3], 3, "relu", "bn")
    x = torch.randn(6, 3)
    with torch.no_grad():   # running stats := the batch stats of x, layer by layer (biased)
        h = x
        for mod in model.layers():
            if isinstance(mod, BatchNorm1d):
                mod.running_mean.copy_(h.mean(0)), mod.running_var.copy_(h.var(0, unbiased=False))
                h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + mod.eps)
            else:
                h = mod(h)
    gaps = ist.forward_both(model, x)
    assert max(gaps["compounded"]) < 1e-6 and max(gaps["local"]) < 1e-6   # float32 path, values O(1)
    assert max(gaps["local_eval_input"]) < 1e-6 and max(gaps["mean_offset"]) < 1e-6
    with torch.no_grad():
        bn_layers(model)[0].running_var.mul_(4.0)   # layer 1 now divides by twice the std: gap 1/2
    gaps = ist.forward_both(model, x)
    comp, local, local_ev = gaps["compounded"], gaps["local"], gaps["local_eval_input"]
    assert local[0] == pytest.approx(0.5, rel=1e-4) and comp[0] == pytest.approx(0.5, rel=1e-4)
    assert local_ev[0] == pytest.approx(0.5, rel=1e-4)   # both paths have the same input at layer 1
    assert local[1] < 1e-6 < comp[1]   # the change only reaches layer 2 through its input
    # Layer 2's eval-path input differs from the train path's (whose batch statistics are the
    # stored ones), so normalizing it with the stored statistics or its own differs there.
    assert local_ev[1] > 1e-3
    assert gaps["mean_offset"][1] < 1e-6   # the train path itself is unchanged


def test_mean_offset_is_the_batch_mean_distance_in_running_stds():
    torch.manual_seed(0)
    model = mlp(2, [2], 2, "relu", "bn")
    x = torch.randn(5, 2)
    with torch.no_grad():
        bn = bn_layers(model)[0]
        h = model.layers()[0](x)
        bn.running_mean.copy_(h.mean(0) - torch.tensor([1.0, -3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 9.0]))
    # offsets 1 / 2 and 3 / 3 per channel: mean 0.75
    assert ist.forward_both(model, x)["mean_offset"][0] == pytest.approx(0.75, rel=1e-5)


def test_fixed_network_sweep_reuses_the_batch_size_network_and_needs_it():
    m = run_experiment("inference_stats", profile="quick", device="cpu", seed=0, **TINY)["metrics"]
    fixed = {r["batch_size"]: r for r in m["fixed_network_sweep"]}
    trained = {r["batch_size"]: r for r in m["batch_size_sweep"]}
    assert sorted(fixed) == [2, 8]
    # At m = batch_size the fixed network is the network trained at that m, evaluated alike.
    assert fixed[8]["gap"] == trained[8]["gap"]
    assert fixed[8]["disagreement"] == trained[8]["disagreement"]
    # The estimators' trace: every eval_every steps.
    assert m["estimators"]["trace"]["step"] == [5, 10, 15, 20]
    with pytest.raises(ValueError, match="batch_size"):
        run_experiment("inference_stats", profile="quick", device="cpu", seed=0,
                       **{**TINY, "batch_size": 4})


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_tiny_run_writes_json_and_figures(profile, tmp_path):
    # full with dataset="digits" and tiny sizes: the full configuration's code paths, quickly
    r = run_experiment("inference_stats", profile=profile, device="cpu", out_dir=tmp_path, **TINY)
    data = json.loads((tmp_path / f"inference_stats-{profile}.json").read_text())
    assert data["profile"] == profile and set(data["metrics"]) == set(r["metrics"])
    assert [p.split("/")[-1] for p in r["figures"]] == [
        f"inference_stats-{profile}-{part}.png" for part in ("estimators", "gap", "accuracy", "depth")]
