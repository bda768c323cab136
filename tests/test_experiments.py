"""bnlib.experiments: CLI, results files, and the metrics on small hand-checkable cases."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from bnlib.experiments import EXPERIMENTS, load_results, run_experiment
from bnlib.experiments.__main__ import main
from bnlib.experiments.common import cpu_threads
from bnlib.experiments.covariate_shift import band_width, relative_drift
from bnlib.experiments.metrics import gradient_change, percentiles, steps_to_reach
from bnlib.experiments.models import NoisyBatchNorm1d, held_noise, mlp
from bnlib.experiments.noisy_bn import ics, layer_params, probe, smoothness
from bnlib.experiments import train as train_mod
from bnlib.experiments.train import batch_indices, frozen_buffers, loss_fn


def test_help_lists_every_experiment(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in text


def test_cli_rejects_unknown_experiment(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no_such_experiment"])
    assert exit_.value.code != 0


# Tiny configurations: digits (ships with scikit-learn, instant), a few steps.
TINY = {
    "covariate_shift": dict(dataset="digits", steps=6, eval_every=3, widths=[8, 8]),
    "noisy_bn": dict(dataset="digits", steps=6, eval_every=3, probe_every=3, probe_batches=2,
                     widths=[8, 8],
                     step_multiples=[1.0, 2.0]),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_run_experiment_writes_json_and_png(name, tmp_path):
    res = run_experiment(name, profile="quick", device="cpu", seed=1, out_dir=tmp_path,
                         **TINY[name])
    path = tmp_path / f"{name}-quick.json"
    assert res["json_path"] == str(path)
    stored = load_results(path)
    assert stored["experiment"] == name and stored["profile"] == "quick"
    assert stored["config"]["steps"] == 6 and stored["seed"] == 1
    assert stored["device_name"].startswith("cpu")
    assert stored["metrics"] == json.loads(json.dumps(res["metrics"]))
    assert res["figures"]
    for fig in res["figures"]:
        with open(fig, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_results(tmp_path, monkeypatch, capsys):
    from bnlib.experiments import covariate_shift
    tiny = {**covariate_shift.PROFILES["quick"], **TINY["covariate_shift"]}
    monkeypatch.setitem(covariate_shift.PROFILES, "quick", tiny)
    main(["covariate_shift", "--profile", "quick", "--device", "cpu", "--out", str(tmp_path),
          "--no-progress"])
    assert (tmp_path / "covariate_shift-quick.json").exists()
    assert (tmp_path / "covariate_shift-quick.png").exists()
    assert "wrote" in capsys.readouterr().err


def test_seeded_runs_repeat():
    # Seeded and deterministic on CPU: the same metrics twice.
    first = run_experiment("noisy_bn", profile="quick", device="cpu", **TINY["noisy_bn"])
    again = run_experiment("noisy_bn", profile="quick", device="cpu", **TINY["noisy_bn"])
    assert first["metrics"] == again["metrics"]


def test_unknown_override_is_an_error():
    with pytest.raises(ValueError, match="unknown settings"):
        run_experiment("covariate_shift", profile="quick", device="cpu", no_such_setting=1)


def test_percentiles_hand_checked():
    x = torch.arange(101, dtype=torch.float64)  # 0..100: the q-th percentile is q
    assert percentiles(x).tolist() == [15.0, 50.0, 85.0]
    y = torch.tensor([0.0, 10.0])  # linear interpolation: q-th percentile of {0, 10} is q/10
    assert torch.allclose(percentiles(y, (15, 50, 85)), torch.tensor([1.5, 5.0, 8.5]))
    z = torch.randn(37, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.allclose(percentiles(z, (15, 50, 85), dim=0).numpy(),
                       np.percentile(z.numpy(), [15, 50, 85], axis=0))
    with pytest.raises(ValueError, match="qs"):
        percentiles(x, (101,))


def test_gradient_change_hand_checked():
    d, c = gradient_change(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert math.isclose(d.item(), math.sqrt(2), rel_tol=1e-6) and abs(c.item()) < 1e-7
    d, c = gradient_change(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
    assert math.isclose(d.item(), math.sqrt(5), rel_tol=1e-6)
    assert math.isclose(c.item(), 1.0, rel_tol=1e-6)
    # Lists of tensors are flattened and concatenated: ([3], [4]) vs ([0], [0]).
    d, c = gradient_change([torch.tensor([3.0]), torch.tensor([[4.0]])],
                           [torch.zeros(1), torch.zeros(1, 1)])
    assert math.isclose(d.item(), 5.0, rel_tol=1e-6) and c.item() == 0.0
    with pytest.raises(ValueError, match="g0 and g1"):
        gradient_change(torch.ones(2), torch.ones(3))


def test_steps_to_reach():
    assert steps_to_reach([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert steps_to_reach([0, 10, 20], [0.1, 0.5, 0.9], 0.95) is None
    with pytest.raises(ValueError, match="same length"):
        steps_to_reach([0], [0.1, 0.2], 0.5)


def test_relative_drift_hand_checked():
    # Two units, 4 records after the (empty, start_fraction=0) warm-up. Unit 0: median goes
    # 0 -> 2, width always 4: drift 2 / 4. Unit 1: constant median, width 1: drift 0.
    pct = torch.tensor([[[-2.0, -1.0], [0.0, 0.0], [2.0, 0.0]],
                        [[-1.0, -1.0], [1.0, 0.0], [3.0, 0.0]],
                        [[0.0, -1.0], [2.0, 0.0], [4.0, 0.0]],
                        [[-1.0, -1.0], [1.0, 0.0], [3.0, 0.0]]])
    assert relative_drift(pct, start_fraction=0.0).tolist() == [0.5, 0.0]
    assert band_width(pct, start_fraction=0.0).tolist() == [4.0, 1.0]
    # start_fraction 0.5 keeps the last two records; unit 0's median still moves 2 -> 1 there.
    assert relative_drift(pct, start_fraction=0.5).tolist() == [0.25, 0.0]


def test_batch_indices_are_epochs_of_permutations():
    idx = batch_indices(10, 3, 7, seed=0)
    assert idx.shape == (7, 3)
    flat = idx.reshape(-1).tolist()
    for epoch in range(2):  # 3 batches of 3 per epoch (one index of 10 dropped each epoch)
        chunk = flat[9 * epoch: 9 * epoch + 9]
        assert len(set(chunk)) == 9
    with pytest.raises(ValueError, match="batch_size"):
        batch_indices(10, 11, 1)


def test_mlp_layers_and_errors():
    net = mlp(4, [5, 6], 3, norm="bn", init_std=0.5)
    assert [tuple(lin.weight.shape) for lin in net.linears()] == [(5, 4), (6, 5), (3, 6)]
    assert net.linears()[0].bias is None  # BN cancels the bias
    logits, pre = net(torch.randn(7, 4), keep_preacts=True)
    assert logits.shape == (7, 3) and [p.shape[1] for p in pre] == [5, 6]
    with pytest.raises(ValueError, match="activation"):
        mlp(4, [5], 3, activation="swish")
    with pytest.raises(ValueError, match="norm"):
        mlp(4, [5], 3, norm="ln")
    with pytest.raises(ValueError, match="init_std"):
        mlp(4, [5], 3, init_std=0.0)


def test_noisy_bn_shifts_in_training_only():
    torch.manual_seed(0)
    layer = NoisyBatchNorm1d(50, shift=1.0, scale=2.0, spread=0.5)
    x = torch.randn(64, 50)
    y = layer(x)
    # Plain BN output has per-unit batch mean 0 and std 1; with noise the unit means spread
    # over [-1, 1] (plus sampling error) and the stds over [0.5, 2.2]: far from (0, 1).
    assert y.mean(0).abs().max() > 0.3
    assert (y.std(0) - 1).abs().max() > 0.2
    with held_noise(layer):
        assert torch.equal(layer(x), layer(x))  # held: the same draw twice
    assert not torch.equal(layer(x), layer(x))   # a new draw every step
    layer.eval()
    assert torch.equal(layer(x), layer.bn(x))    # eval: plain BN
    with pytest.raises(ValueError, match="scale"):
        NoisyBatchNorm1d(3, scale=0.5)


def test_frozen_buffers_restores_running_stats():
    net = mlp(4, [5], 3, norm="bn")
    before = copy.deepcopy(net.state_dict())
    with frozen_buffers(net):
        net(torch.randn(8, 4) + 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cpu_threads_restores():
    before = torch.get_num_threads()
    with cpu_threads("cpu", threads=1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_ics_matches_an_independent_computation():
    torch.manual_seed(0)
    net = mlp(6, [5, 4], 3, norm="bn").double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    lr = 0.3
    dist, rel, cos = ics(net, x, y, lr)
    # By hand for layer 2: gradient now; then an SGD step on layer 1 only, on a copy.
    g_now = torch.autograd.grad(loss_fn(net, x, y), layer_params(net)[1])
    other = copy.deepcopy(net)
    opt = torch.optim.SGD(layer_params(other)[0], lr=lr)
    loss_fn(other, x, y).backward()
    opt.step()
    g_after = torch.autograd.grad(loss_fn(other, x, y), layer_params(other)[1])
    d, c = gradient_change(g_now, g_after)
    assert torch.allclose(dist[0], d) and torch.allclose(cos[0], c)
    assert dist.shape == (2,) and bool(dist[0] > 0)
    # The probe leaves the parameters where they were.
    assert torch.equal(loss_fn(net, x, y), loss_fn(net, x, y))


def test_smoothness_on_a_linear_model_hand_checked():
    # One linear layer (no hidden layers): the definition, beta = max over eta of
    # ||g(w - eta g) - g|| / (eta ||g||), against a direct computation on moved copies.
    torch.manual_seed(0)
    net = mlp(3, [], 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    params = list(net.parameters())
    g = torch.autograd.grad(loss_fn(net, x, y), params)
    gn = torch.cat([t.reshape(-1) for t in g]).norm()
    betas, losses = [], []
    for eta in (0.5, 1.0):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for p, t in zip(moved.parameters(), g):
                p -= eta * t
        loss = loss_fn(moved, x, y)
        g2 = torch.autograd.grad(loss, list(moved.parameters()))
        betas.append(gradient_change(g, g2)[0] / (eta * gn))
        losses.append(loss)
    loss_range, _, beta = smoothness(net, x, y, lr=0.5, multiples=[1.0, 2.0])
    assert torch.allclose(beta, max(betas))
    assert torch.allclose(loss_range, (losses[0] - losses[1]).abs())


def test_probe_averages_single_batch_probes_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = mlp(6, [5, 4], 3, norm="bn").double()
    xs, ys = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    batches = batch_indices(40, 10, 4, seed=0, device="cpu")
    cfg = {"lr": 0.3, "step_multiples": [1.0, 2.0], "probe_batches": 2}
    before = copy.deepcopy(net.state_dict())
    avg = probe(net, xs, ys, batches, 3, cfg)  # step 3's batch, then (wrapping) step 0's
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    singles = [ics(net, xs[batches[i]], ys[batches[i]], 0.3)
               + smoothness(net, xs[batches[i]], ys[batches[i]], 0.3, [1.0, 2.0]) for i in (3, 0)]
    keys = ("ics_l2", "ics_relative", "ics_cosine", "loss_range", "grad_change", "beta")
    for n, key in enumerate(keys):
        assert torch.allclose(avg[key], (singles[0][n] + singles[1][n]) / 2), key
    assert not torch.allclose(singles[0][0], singles[1][0])  # two different batches
    assert avg["ics_cosine"].shape == (2,)


def test_init_std_gives_every_architecture_the_same_weights():
    nets = {}
    for norm in (None, "bn", "noisy_bn"):
        torch.manual_seed(3)
        nets[norm] = mlp(6, [5, 4], 3, norm=norm, init_std=0.1)
    for norm in ("bn", "noisy_bn"):
        for a, b in zip(nets[None].linears(), nets[norm].linears()):
            assert torch.equal(a.weight, b.weight)
    torch.manual_seed(4)
    assert not torch.equal(mlp(6, [5, 4], 3, init_std=0.1).out.weight, nets[None].out.weight)


def _tiny_training(seed=0):
    """A small BN sigmoid MLP, its SGD, data and 23 steps of batch indices (on CPU)."""
    torch.manual_seed(seed)
    model = mlp(6, [8, 8], 3, "sigmoid", "bn", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    return model, opt, x, y, batch_indices(40, 10, 23, seed=seed)


def _plain_loop(model, opt, x, y, batches):
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        train_mod.loss_fn(model, x[idx], y[idx]).backward()
        opt.step()


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def test_chunk_runner_on_a_cpu_is_the_plain_step_loop():
    model, opt, x, y, batches = _tiny_training()
    run = train_mod.chunk_runner(model, opt, x, y, chunk=10)
    for start in range(0, 23, 10):                     # chunks of 10, 10, then 3 steps
        run(batches[start:start + 10])
    assert run.state["graph"] is None and run.state["failed"]   # no graphs on a CPU
    ref_model, ref_opt, *_ = _tiny_training()
    _plain_loop(ref_model, ref_opt, x, y, batches)
    for a, b in zip(_state(model), _state(ref_model)):
        assert torch.equal(a, b)


def test_a_failed_capture_undoes_its_warm_up_and_trains_eagerly(monkeypatch):
    """Capture runs three real warm-up steps before it can fail; they must leave no trace, in
    the parameters or in the optimizer's momentum buffers that existed before. Here CUDA's
    stream and graph calls are stand-ins (this runs on a CPU) and the capture raises."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        pass

    @contextlib.contextmanager
    def failing_capture(graph):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", failing_capture)
    model, opt, x, y, batches = _tiny_training()
    run = train_mod.chunk_runner(model, opt, x, y, chunk=10, graphs=True)
    run(batches[:3])                     # a short chunk runs eagerly: momentum buffers exist now
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        run(batches[3:13])               # warm-up steps, then the capture fails
    run(batches[13:23])
    assert run.state["failed"] and run.state["graph"] is None
    ref_model, ref_opt, *_ = _tiny_training()
    _plain_loop(ref_model, ref_opt, x, y, batches)
    for a, b in zip(_state(model), _state(ref_model)):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_trains_like_eager_steps():
    def trained(graphs):
        model, opt, x, y, batches = _tiny_training()
        model, x, y, batches = model.cuda(), x.cuda(), y.cuda(), batches.cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        run = train_mod.chunk_runner(model, opt, x, y, chunk=10, graphs=graphs)
        for start in range(0, 23, 10):
            run(batches[start:start + 10])
        return run, _state(model)
    graphed, got = trained(True)
    eager, want = trained(False)
    assert graphed.state["graph"] is not None and eager.state["graph"] is None
    for a, b in zip(got, want):
        # Same kernels in the same order; cuBLAS may pick another algorithm under capture, so
        # float32 rounding (a few ulps per step over 23 steps) rather than bitwise equality.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mnist1d_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from bnlib.experiments import common
    monkeypatch.setenv("BNLIB_CACHE_DIR", str(tmp_path))
    first = common.load_dataset("mnist1d", seed=3, num_samples=300)
    (cached,) = (tmp_path / "mnist1d").iterdir()
    assert "seed3-n300" in cached.name and cached.suffix == ".npz"
    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: pytest.fail("regenerated"))
    again = common.load_dataset("mnist1d", seed=3, num_samples=300)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not list((tmp_path / "mnist1d").glob("*.tmp*"))       # no partial file left
