"""bnlib.experiments.noisy_bn: the ICS and smoothness probes against independent computations,
and a tiny seeded run."""
import copy

import torch

from bnlib.experiments import run_experiment
from bnlib.experiments.metrics import gradient_change
from bnlib.experiments.models import mlp
from bnlib.experiments.noisy_bn import ics, layer_params, probe, smoothness
from bnlib.experiments.training import batch_indices, loss_fn

TINY = dict(dataset="digits", steps=6, eval_every=3, probe_every=3, probe_batches=2,
            widths=[8, 8], step_multiples=[1.0, 2.0])


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


def test_tiny_run_is_seeded_and_records_where_its_profile_says(tmp_path):
    first = run_experiment("noisy_bn", profile="quick", device="cpu", out_dir=tmp_path, **TINY)
    again = run_experiment("noisy_bn", profile="quick", device="cpu", **TINY)
    assert first["metrics"] == again["metrics"]        # seeded and deterministic on CPU
    m = first["metrics"]
    assert m["steps"] == [3, 6] and m["probe_steps"] == [3, 6]
    for norm in ("no_bn", "bn", "noisy_bn"):
        assert len(m[norm]["test_accuracy"]) == 2 and len(m[norm]["ics_cosine"]) == 2
    assert [p.split("/")[-1] for p in first["figures"]] == ["noisy_bn-quick-training.png",
                                                           "noisy_bn-quick-probes.png"]


def test_figures_have_at_most_two_panels_per_row():
    import matplotlib.pyplot as plt

    from bnlib.experiments.runner import draw
    res = run_experiment("noisy_bn", profile="quick", device="cpu", **TINY)
    figs = draw(res)
    try:
        assert list(figs) == ["training", "probes"]
        for fig in figs.values():
            # Readable on a 390-px phone: 2 x 2 grids, never a row of three.
            assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 2)}
        # training: three plotted panels and the legend (one entry per network) in the fourth.
        slot = [ax for ax in figs["training"].axes if not ax.axison]
        assert len(slot) == 1
        assert [t.get_text() for t in slot[0].get_legend().get_texts()] == [
            "without BN", "with BN", "noisy BN"]
    finally:
        for fig in figs.values():
            plt.close(fig)
