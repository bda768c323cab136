"""bnlib.experiments.sync_bn: ghost BN's arithmetic, and a tiny run through the runner (real
gloo processes for the traffic and time part)."""
import pytest
import torch

from bnlib.experiments import run_experiment
from bnlib.experiments import sync_bn as exp

TINY = dict(dataset="digits", global_batch=8, per_rank=[2, 8], seeds=1, width=8, steps=3,
            world_sizes=[2], time_channels=[4], time_batch=4, reps=2)


def test_ghost_bn_normalises_each_group_and_keeps_group_zero_statistics():
    x = torch.randn(12, 5, dtype=torch.float32) * 3 + 1
    ghost = exp.GhostBatchNorm1d(5, group=4, momentum=1.0)
    y = ghost(x)
    for k in range(3):  # each group of 4 is normalised by its own statistics
        part = x[4 * k:4 * k + 4]
        ref = torch.nn.functional.batch_norm(part, None, None, training=True)
        torch.testing.assert_close(y[4 * k:4 * k + 4], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.running_mean, x[:4].mean(0))
    torch.testing.assert_close(ghost.running_var, x[:4].var(0))
    whole = exp.GhostBatchNorm1d(5, group=12)(x)  # one group: plain BN on the whole batch
    torch.testing.assert_close(whole, torch.nn.functional.batch_norm(x, None, None, training=True),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="groups of 5"):
        exp.GhostBatchNorm1d(5, group=5)(x)


def test_tiny_run_counts_bytes_and_times():
    r = run_experiment("sync_bn", profile="quick", device="cpu", **TINY)
    acc = r["metrics"]["accuracy"]
    assert [a["per_rank"] for a in acc] == [2, 8] and [a["ranks"] for a in acc] == [4, 1]
    assert all(0 <= a["acc_eval"] <= 1 and 0 <= a["acc_train_mode"] <= 1 for a in acc)
    (d,) = r["metrics"]["distributed"]
    # two BN layers of width 8: header 32 + forward 2C float64 + backward 2C float32 each
    assert d["syncbn_bytes"] == 2 * (32 + 24 * 8) and d["syncbn_calls"] == 6
    assert d["ddp_bytes"] == 4 * d["parameters"]
    (t,) = d["timings"]
    assert t["channels"] == 4 and t["sync_ms"] > 0 and t["local_ms"] > 0
    figs = exp.figures(r)
    assert set(figs) == {"accuracy", "gap"}
