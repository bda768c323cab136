"""Training for the experiments: minibatch indices, loss, accuracy, and the one SGD loop (train).

train runs its steps in chunks and calls a hook between them (every=1: after every step);
on CUDA, ChunkRunner replays each full chunk as one captured CUDA graph.
"""
import contextlib
import math
import os
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm


def batch_indices(n, batch_size, steps, seed=0, device="cpu"):
    """Indices of every minibatch for `steps` steps, shape (steps, batch_size), on device.

    Each epoch is a fresh permutation of range(n) (seeded); a partial last batch is dropped.
    Built once up front, so the loop never waits on the host for its next batch.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, n={n}], got {batch_size!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    per_epoch = n // batch_size
    gen = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps / per_epoch)
    idx = torch.cat([torch.randperm(n, generator=gen)[:per_epoch * batch_size]
                     for _ in range(epochs)])
    return idx[:steps * batch_size].view(steps, batch_size).to(device)


def loss_fn(model, x, y):
    """Mean cross-entropy of model on (x, y)."""
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model, x, y):
    """Fraction of x classified as y, in eval mode (a 0-d tensor: no host sync)."""
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean()
    model.train(was)
    return acc


@contextlib.contextmanager
def frozen_buffers(model):
    """Undo, on exit, every change to model's buffers (BN running statistics) made in the block."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


def progress(total, enabled, desc):
    """A tqdm bar on the command line; a silent stand-in when disabled (the book)."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def stack_list(values):
    """Stack a list of 0-d or 1-d tensors and bring them to the host as nested lists, once."""
    return torch.stack(values).detach().cpu().tolist()


def cuda_graphs_wanted(device):
    """CUDA graphs on CUDA unless BNLIB_CUDA_GRAPHS=0; never on a CPU."""
    return str(device).startswith("cuda") and os.environ.get("BNLIB_CUDA_GRAPHS", "1") != "0"


def _sgd_steps(model, opt, x, y, idx, loss):
    """One optimizer step on x[idx[k]], y[idx[k]] per row k of idx; their losses (no host sync)."""
    losses = []
    for k in range(idx.shape[0]):
        i = idx[k]
        opt.zero_grad(set_to_none=True)
        value = loss(model, x[i], y[i])
        value.backward()
        opt.step()
        losses.append(value.detach())
    return torch.stack(losses)


class ChunkRunner:
    """run(idx): one SGD step per row of idx, an (s, batch_size) index tensor; returns the s losses.

    On CUDA, a chunk of exactly `chunk` steps is captured once as a CUDA graph and then replayed:
    one launch per chunk instead of a hundred or so small kernels per step, each launched from
    Python, which is what a small network's training costs on a GPU. The replayed kernels are
    the eager ones, in the same order, so the results are the same (bit for bit where the
    kernels are deterministic). Capture runs three warm-up steps first, as CUDA requires, and
    then puts the parameters, buffers and optimizer state back as they were (plain or momentum
    SGD). Anything else (CPU, a chunk of another length, graphs=False, another optimizer, a
    capture that fails) runs the same steps eagerly; a failed capture warns once.
    .graph is the captured graph, or None; .failed says the runner has given up on graphs.
    What a graph fixes at capture: the learning rate (later changes to opt.param_groups are not
    seen), the batch size (idx of another width fails), and any random draws (a stochastic
    layer replays the same noise: use graphs=False for one).
    """

    def __init__(self, model, opt, x, y, chunk, graphs=None, loss=loss_fn):
        graphs = cuda_graphs_wanted(x.device) if graphs is None else graphs
        # Undoing the warm-up is exact for SGD without dampening: a momentum buffer set to zero
        # gives the first real step buf = grad, as a fresh one does. Other optimizers: eager.
        sgd = isinstance(opt, torch.optim.SGD) and all(g["dampening"] == 0 for g in opt.param_groups)
        self.model, self.opt, self.x, self.y, self.chunk, self.loss = model, opt, x, y, chunk, loss
        self.graph, self.failed = None, not (graphs and sgd)
        self._idx = self._losses = None

    def _steps(self, idx):
        return _sgd_steps(self.model, self.opt, self.x, self.y, idx, self.loss)

    def _capture(self, idx):
        model, opt = self.model, self.opt
        tensors = list(model.parameters()) + list(model.buffers())
        saved = [t.detach().clone() for t in tensors]
        # The optimizer's state as it is (empty before the first step, momentum buffers after).
        saved_state = {id(v): v.detach().clone() for st in opt.state.values()
                       for v in st.values() if torch.is_tensor(v)}
        self._idx = idx.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._steps(self._idx[:3])  # warm-up: creates optimizer state
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._losses = self._steps(self._idx)
        finally:  # undo the warm-up in place (the graph holds these addresses), even on failure
            with torch.no_grad():
                for t, v in zip(tensors, saved):
                    t.copy_(v)
                for st in opt.state.values():
                    for v in st.values():
                        if not torch.is_tensor(v):
                            continue
                        if id(v) in saved_state:  # as it was before the warm-up
                            v.copy_(saved_state[id(v)])
                        else:                     # created by the warm-up: as if never made
                            v.zero_()
        return graph

    def __call__(self, idx):
        if self.failed or idx.shape[0] != self.chunk:
            return self._steps(idx)
        if self.graph is None:
            try:
                self.graph = self._capture(idx)
            except Exception as err:  # an op that cannot be captured: train eagerly
                self.failed = True
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); "
                              "training without graphs", RuntimeWarning, stacklevel=2)
                return self._steps(idx)
        self._idx.copy_(idx)
        self.graph.replay()
        return self._losses.clone()  # the graph overwrites its output at the next replay


def train(model, opt, x, y, batches, every=1, hook=None, loss=loss_fn, graphs=None, show=False,
          desc="train"):
    """Train model with opt: one step on (x[i], y[i]) for each row i of batches, an (steps,
    batch_size) index tensor (see batch_indices). Returns the per-step losses (floats).

    The steps run in chunks of `every`; hook(done, loss) is called before the first step
    (done=0, loss None) and after each chunk (done = steps so far, loss = that step's loss, a
    0-d tensor): with every=1 it is a per-step hook. With every > 1 on CUDA each full chunk is
    one CUDA graph replay (ChunkRunner; graphs=False turns that off, as a stochastic layer
    needs). loss(model, x, y) -> 0-d tensor is what each step minimizes. Once a loss is not
    finite, training stops: that step's loss and the rest are nan, and the hook is not called.
    """
    steps = batches.shape[0]
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every!r}")
    run = ChunkRunner(model, opt, x, y, every, graphs=graphs if every > 1 else False, loss=loss)
    model.train()
    values, bar = [], progress(steps, show, desc)
    if hook is not None:
        hook(0, None)
    for start in range(0, steps, every):
        chunk = run(batches[start:start + every])
        values.append(chunk)
        if not bool(torch.isfinite(chunk).all()):  # one host sync per chunk
            break
        if hook is not None:
            hook(start + chunk.shape[0], chunk[-1])
        bar.update(chunk.shape[0])
    bar.close()
    values = torch.cat(values).tolist()
    finite = next((k for k, v in enumerate(values) if not math.isfinite(v)), len(values))
    return values[:finite] + [float("nan")] * (steps - finite)


def train_sgd(model, x, y, steps, batch_size, lr, momentum=0.9, seed=0, **options):
    """train() with SGD (lr, momentum) on `steps` seeded minibatches of batch_size: the common case.

    options go to train (every, hook, loss, graphs, show, desc).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return train(model, opt, x, y, batch_indices(len(x), batch_size, steps, seed, x.device),
                 **options)
