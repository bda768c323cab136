"""bnlib.nn.SyncBatchNorm with real processes: WORLD ranks on gloo (tests/sync_workers.py, one
spawn for every scenario, bounded by run_ranks' timeout) against one process on the
concatenated batch in float64; plus what needs no process group (fallback, conversion,
state_dict, the merge formula)."""
import pytest
import torch
import torch.nn.functional as F

import bnlib.nn
import sync_workers as sw
from bnlib.processes import run_ranks
from bnlib.sync import SyncBatchNorm, merge_stats

# float64 end to end: the only differences from the one-process reference are the order of the
# reductions (per shard, then merged); relative rounding stays within a few hundred ulps of
# 2.2e-16 for these sizes (<= 60 values a channel), so 1e-12 is loose by three orders and still
# far below any real error (a wrong count or missing term changes results at 1e-2 or more).
TOL = 1e-12


@pytest.fixture(scope="module")
def ranks():
    # Under a minute with three ranks on two busy cores (spawn and import dominate); a hung
    # collective times out after 60 s and fails the test instead of hanging it.
    return run_ranks(sw.everything, sw.WORLD, timeout_s=120)


def reference(name, step, bn):
    sizes, shape, momentum, _ = sw.CASES[name]
    x, dy, _ = sw.batch(10 + step, sizes, shape)
    x = x.clone().requires_grad_(True)
    y = bn(x)
    y.backward(dy)
    return y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


@pytest.mark.parametrize("name", list(sw.CASES))
def test_training_matches_one_process_on_the_whole_batch(ranks, name):
    sizes, shape, momentum, steps = sw.CASES[name]
    ref_bn = torch.nn.BatchNorm1d(shape[0], momentum=momentum, dtype=torch.float64)
    w, b = sw.params(shape[0])
    with torch.no_grad():
        ref_bn.weight.copy_(w)
        ref_bn.bias.copy_(b)
    for step in range(steps):
        ref = reference(name, step, ref_bn) if len(shape) < 3 else None
        if ref is None:  # (N, C, H, W): torch's 2d layer
            ref_bn2 = torch.nn.BatchNorm2d(shape[0], momentum=momentum, dtype=torch.float64)
            ref_bn2.load_state_dict(ref_bn.state_dict())
            ref = reference(name, step, ref_bn2)
            ref_bn.load_state_dict(ref_bn2.state_dict())
        ref_bn.weight.grad = ref_bn.bias.grad = None
        y, dx, dw, db = ref
        got = [r[name]["steps"][step] for r in ranks]
        assert all(g["grad_fn"].startswith("SyncBatchNormFunction") for g in got), got[0]["grad_fn"]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), y, rtol=TOL, atol=TOL)
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), dx, rtol=TOL, atol=TOL)
        # dgamma, dbeta stay per rank: their sum over ranks (what DDP forms) is the whole batch's.
        torch.testing.assert_close(sum(g["dweight"] for g in got), dw, rtol=TOL, atol=TOL)
        torch.testing.assert_close(sum(g["dbias"] for g in got), db, rtol=TOL, atol=TOL)
        for g, size in zip(got, sizes):
            assert g["y"].shape[0] == size
    for r in ranks:  # global count, unbiased variance; the same bits on every rank
        torch.testing.assert_close(r[name]["running_mean"], ref_bn.running_mean, rtol=TOL, atol=TOL)
        torch.testing.assert_close(r[name]["running_var"], ref_bn.running_var, rtol=TOL, atol=TOL)
        assert torch.equal(r[name]["running_var"], ranks[0][name]["running_var"])
        assert r[name]["tracked"] == steps


def test_float32_at_an_offset_is_as_accurate_as_one_process(ranks):
    x, _, _ = sw.batch(3, [16, 16, 16], (4, 8), dtype=torch.float32, offset=1e4)
    truth = F.batch_norm(x.double(), None, None, training=True)
    one = bnlib.nn.BatchNorm1d(4, affine=False)(x).double()
    synced = torch.cat([r["offset"]["y"] for r in ranks]).double()
    err_one = (one - truth).abs().max().item()
    err_sync = (synced - truth).abs().max().item()
    # Both lose the same thing, x's own float32 rounding at 1e4 (ulp 1e-3, i.e. ~1e-3 in y for
    # unit-variance data); the merge adds rounding of order 1e-7 relative. Twice the one-process
    # error bounds that; E[x^2] - E[x]^2 in float32 would be off by ~ulp(1e8) = 8 in the variance.
    assert err_sync <= 2 * err_one + 1e-5, (err_sync, err_one)
    var_truth = x.double().transpose(0, 1).reshape(4, -1).var(1)
    torch.testing.assert_close(ranks[0]["offset"]["running_var"].double(), var_truth, rtol=1e-3,
                               atol=0)
    naive = (x.double() ** 2).float().mean((0, 2)) - x.mean((0, 2)) ** 2
    assert (naive.double() - var_truth).abs().max() > 0.1  # the cancellation the merge avoids


def test_eval_sends_nothing(ranks):
    assert [r["eval"]["sum"] for r in ranks] == [float(sum(range(sw.WORLD)))] * sw.WORLD
    x = sw.batch(5, [4] * sw.WORLD, (3,))[0][:4]
    w, b = sw.params(3)
    rm = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    rv = torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(ranks[0]["eval"]["y"], F.batch_norm(x, rm, rv, w, b, False),
                               rtol=TOL, atol=TOL)


def test_errors_raise_on_every_rank_and_the_group_survives(ranks):
    for rank, r in enumerate(ranks):
        e = r["errors"]
        assert e["channels"][0] == "ValueError" and "channels" in e["channels"][1], e
        assert "[3, 4, 3]" in e["channels"][1]
        assert e["dtype"][0] == "TypeError" and "torch.float64" in e["dtype"][1], e
        assert e["one_value"][0] == "ValueError", e
        assert "Expected more than 1 value per channel" in e["one_value"][1]
        expected = "to match the 4 channels" if rank == 1 else "rank(s) [1]"
        assert e["local_check"] is not None and expected in e["local_check"][1], e
        assert e["after"] == sw.WORLD


def test_group_of_one_is_plain_bn(ranks):
    for r in ranks:
        g = r["group_of_one"]
        torch.testing.assert_close(g["y"], F.batch_norm(g["x"], None, None, training=True),
                                   rtol=TOL, atol=TOL)
        torch.testing.assert_close(g["running_mean"], 0.1 * g["x"].mean(0), rtol=TOL, atol=TOL)


def test_ddp_training_equals_one_process_training(ranks):
    model = sw.tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=sw.DDP_LR)
    for step in range(sw.DDP_STEPS):
        x, y = sw.ddp_data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    ref = model.state_dict()
    for r in ranks:
        assert set(r["ddp"]) == set(ref)
        for k, v in ref.items():
            # three steps of lr 0.1 on O(1) gradients: float64 rounding grows by at most a few
            # ulps per step; DDP's average (sum / 3) differs from the one-process mean in rounding
            torch.testing.assert_close(r["ddp"][k], v, rtol=1e-10, atol=1e-12, msg=k)


# --- without a process group ------------------------------------------------------------------

def test_without_a_process_group_it_is_plain_bn():
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    ours, theirs = SyncBatchNorm(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SyncBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)


def test_arguments_defaults_and_state_dict_as_torch():
    import inspect
    ours = inspect.signature(SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(torch.nn.SyncBatchNorm.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == \
        [(p.name, p.default) for p in theirs.values()]
    for kw in ({}, dict(affine=False), dict(track_running_stats=False)):
        assert list(SyncBatchNorm(5, **kw).state_dict()) == \
            list(torch.nn.SyncBatchNorm(5, **kw).state_dict())
    assert bnlib.nn.SyncBatchNorm is SyncBatchNorm
    # a torch BN layer (tools that look for BN layers find it), not a torch.nn.SyncBatchNorm,
    # which DDP refuses on CPU
    assert isinstance(SyncBatchNorm(2), torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(SyncBatchNorm(2), torch.nn.SyncBatchNorm)


def test_convert_keeps_parameters_and_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                              torch.nn.Sequential(bnlib.nn.BatchNorm1d(2, momentum=None)),
                              torch.nn.BatchNorm3d(2, affine=False))
    with torch.no_grad():
        net[1].running_mean.fill_(0.25)
        net[1].num_batches_tracked.fill_(7)
    net[2].eval()
    weight, stats = net[1].weight, net[1].running_mean
    out = SyncBatchNorm.convert_sync_batchnorm(net)
    assert out is net and isinstance(net[0], torch.nn.Conv2d)
    assert [type(m) for m in (net[1], net[2][0], net[3])] == [SyncBatchNorm] * 3
    assert net[1].weight is weight and net[1].running_mean is stats
    assert int(net[1].num_batches_tracked) == 7
    assert net[2][0].momentum is None and not net[2][0].training and net[3].weight is None
    single = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(single) is SyncBatchNorm


def test_merge_is_chan_et_al():
    x = torch.randn(10, 3, dtype=torch.float64)
    parts = [x[:2], x[2:2], x[2:10]]
    counts = torch.tensor([len(p) for p in parts])
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=x.dtype) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=x.dtype)
                       for p in parts])
    n, mean, m2 = merge_stats(counts, means, m2s)
    assert int(n) == 10
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(m2, x.var(0, correction=0) * 10)


def test_a_hung_collective_fails_within_the_timeout():
    import time
    start = time.monotonic()
    with pytest.raises(Exception) as failure:  # noqa: PT011 (gloo's timeout or run_ranks' own)
        run_ranks(sw.lone_collective, 2, timeout_s=8)
    # the group's timeout (4 s) or run_ranks' deadline (8 s) ends it, long before rank 1's 60 s
    # sleep would; 45 s allows for spawning two processes on a loaded two-core machine
    assert time.monotonic() - start < 45, failure.value
    assert "timed out" in str(failure.value).lower() or "took more than" in str(failure.value)
