"""bnlib.experiments.training: minibatches, frozen buffers, and the one loop (train) with its
chunks, hook and CUDA graphs (ChunkRunner)."""
import contextlib
import copy
import math

import pytest
import torch

from bnlib.experiments import training as T
from bnlib.experiments.models import mlp


def test_batch_indices_are_epochs_of_permutations():
    idx = T.batch_indices(10, 3, 7, seed=0)
    assert idx.shape == (7, 3)
    flat = idx.reshape(-1).tolist()
    for epoch in range(2):  # 3 batches of 3 per epoch (one index of 10 dropped each epoch)
        chunk = flat[9 * epoch: 9 * epoch + 9]
        assert len(set(chunk)) == 9
    with pytest.raises(ValueError, match="batch_size"):
        T.batch_indices(10, 11, 1)
    with pytest.raises(ValueError, match="steps"):
        T.batch_indices(10, 3, 0)


def test_frozen_buffers_restores_running_stats():
    net = mlp(4, [5], 3, norm="bn")
    before = copy.deepcopy(net.state_dict())
    with T.frozen_buffers(net):
        net(torch.randn(8, 4) + 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def _tiny_training(seed=0):
    """A small BN sigmoid MLP, its SGD, data and 23 steps of batch indices (on CPU)."""
    torch.manual_seed(seed)
    model = mlp(6, [8, 8], 3, "sigmoid", "bn", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    return model, opt, x, y, T.batch_indices(40, 10, 23, seed=seed)


def _plain_loop(model, opt, x, y, batches):
    losses = []
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = T.loss_fn(model, x[idx], y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _state(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def test_train_in_chunks_on_a_cpu_is_the_plain_step_loop_with_a_hook_between_chunks():
    model, opt, x, y, batches = _tiny_training()
    calls = []
    losses = T.train(model, opt, x, y, batches, every=10,
                     hook=lambda done, loss: calls.append((done, None if loss is None else loss.item())))
    ref_model, ref_opt, *_ = _tiny_training()
    want = _plain_loop(ref_model, ref_opt, x, y, batches)
    for a, b in zip(_state(model), _state(ref_model)):
        assert torch.equal(a, b)                       # bit for bit: the same steps, eagerly
    assert losses == want
    # Before the first step, then after chunks of 10, 10 and the last 3, with that step's loss.
    assert calls == [(0, None), (10, want[9]), (20, want[19]), (23, want[22])]


def test_the_chunk_runner_on_a_cpu_never_makes_a_graph():
    model, opt, x, y, batches = _tiny_training()
    run = T.ChunkRunner(model, opt, x, y, chunk=10)
    for start in range(0, 23, 10):
        run(batches[start:start + 10])
    assert run.graph is None and run.failed


def test_a_failed_capture_undoes_its_warm_up_and_trains_eagerly(monkeypatch):
    """Capture runs three real warm-up steps before it can fail; they must leave no trace, in
    the parameters or in the optimizer's momentum buffers that existed before. Here CUDA's
    stream and graph calls are stand-ins (this runs on a CPU) and the capture raises."""

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
    # A first call of 3 steps (a short chunk runs eagerly): momentum buffers exist now.
    T.train(model, opt, x, y, batches[:3], every=10, graphs=True)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        T.train(model, opt, x, y, batches[3:], every=10, graphs=True)  # warm-up, then it fails
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
        run = T.ChunkRunner(model, opt, x, y, chunk=10, graphs=graphs)
        losses = torch.cat([run(batches[start:start + 10]) for start in range(0, 23, 10)])
        return run, _state(model), losses
    graphed, got, got_losses = trained(True)
    eager, want, want_losses = trained(False)
    assert graphed.graph is not None and eager.graph is None
    for a, b in zip(got + [got_losses], want + [want_losses]):
        # Same kernels in the same order; cuBLAS may pick another algorithm under capture, so
        # float32 rounding (a few ulps per step over 23 steps) rather than bitwise equality.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_train_stops_on_divergence():
    torch.manual_seed(0)
    # a linear net (no ReLU to die) at lr 100: the loss overflows within a few steps
    model = mlp(4, [8] * 2, 3, "linear", he_scale=1.0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    calls = []
    losses = T.train_sgd(model, x, y, steps=50, batch_size=8, lr=100.0,
                         hook=lambda done, loss: calls.append(done))
    assert len(losses) == 50 and math.isnan(losses[-1]) and math.isfinite(losses[0])
    first_bad = next(k for k, v in enumerate(losses) if not math.isfinite(v))
    assert all(math.isnan(v) for v in losses[first_bad:])
    assert calls == list(range(first_bad + 1))   # no hook after the step that diverged


def test_train_sgd_is_train_with_sgd_on_seeded_batches():
    model, _, x, y, _ = _tiny_training()
    got = T.train_sgd(model, x, y, steps=23, batch_size=10, lr=0.5, momentum=0.9, seed=0)
    ref_model, ref_opt, _, _, batches = _tiny_training()
    assert got == _plain_loop(ref_model, ref_opt, x, y, batches)
    with pytest.raises(ValueError, match="every"):
        T.train(model, ref_opt, x, y, batches, every=0)
