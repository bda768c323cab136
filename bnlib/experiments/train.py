"""Training helpers shared by the experiments: minibatch indices, loss, accuracy, an SGD loop."""
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


def _sgd_steps(model, opt, x, y, idx):
    """One SGD step on x[idx[k]], y[idx[k]] for each row k of idx (no host syncs)."""
    for k in range(idx.shape[0]):
        i = idx[k]
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x[i], y[i]).backward()
        opt.step()


def cuda_graphs_wanted(device):
    """CUDA graphs on CUDA unless BNLIB_CUDA_GRAPHS=0; never on a CPU."""
    return str(device).startswith("cuda") and os.environ.get("BNLIB_CUDA_GRAPHS", "1") != "0"


def chunk_runner(model, opt, x, y, chunk, graphs=None):
    """A function run(idx) doing one SGD step per row of idx, an (s, batch_size) index tensor.

    On CUDA, a chunk of exactly `chunk` steps is captured once as a CUDA graph and then replayed:
    one launch per chunk instead of a hundred or so small kernels per step, each launched from
    Python, which is what a small network's training costs on a GPU. The replayed kernels are
    the eager ones, in the same order, so the results are the same (bit for bit where the
    kernels are deterministic). Capture runs three warm-up steps first, as CUDA requires, and
    then puts the parameters, buffers and optimizer state back as they were (plain or momentum
    SGD). Anything else (CPU, a chunk of another length, graphs=False, another optimizer, a
    capture that fails) runs the same steps eagerly; a failed capture warns once.
    run.state["graph"] is the captured graph, or None.
    What a graph fixes at capture: the learning rate (later changes to opt.param_groups are not
    seen), the batch size (idx of another width fails), and any random draws (a stochastic
    layer replays the same noise: use graphs=False for one).
    """
    graphs = cuda_graphs_wanted(x.device) if graphs is None else graphs
    # Undoing the warm-up is exact for SGD without dampening: a momentum buffer set to zero
    # gives the first real step buf = grad, as a fresh one does. Other optimizers: eager.
    sgd = isinstance(opt, torch.optim.SGD) and all(g["dampening"] == 0 for g in opt.param_groups)
    state = {"graph": None, "failed": not (graphs and sgd)}
    static_idx = None

    def capture(idx):
        nonlocal static_idx
        tensors = list(model.parameters()) + list(model.buffers())
        saved = [t.detach().clone() for t in tensors]
        # The optimizer's state as it is (empty before the first step, momentum buffers after).
        saved_state = {id(v): v.detach().clone() for st in opt.state.values()
                       for v in st.values() if torch.is_tensor(v)}
        static_idx = idx.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _sgd_steps(model, opt, x, y, static_idx[:3])  # warm-up: creates optimizer state
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _sgd_steps(model, opt, x, y, static_idx)
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

    def run(idx):
        if state["failed"] or idx.shape[0] != chunk:
            _sgd_steps(model, opt, x, y, idx)
            return
        if state["graph"] is None:
            try:
                state["graph"] = capture(idx)
            except Exception as err:  # an op that cannot be captured: train eagerly
                state["failed"] = True
                warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); "
                              "training without graphs", RuntimeWarning, stacklevel=2)
                _sgd_steps(model, opt, x, y, idx)
                return
        static_idx.copy_(idx)
        state["graph"].replay()

    run.state = state
    return run


def train(model, x, y, steps, batch_size, lr, seed=0, sgd_momentum=0.9, lr_fn=None, callback=None,
          show=False):
    """SGD on cross-entropy; lr_fn(step) -> lr overrides lr; callback(step, model, loss) after each step.

    Returns the list of per-step training losses (nan once the loss has diverged; training stops).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=sgd_momentum)
    batches = batch_indices(len(x), batch_size, steps, seed, x.device)
    losses = []
    bar = progress(steps, show, "train")
    model.train()
    for step in range(steps):
        if lr_fn is not None:
            for group in opt.param_groups:
                group["lr"] = lr_fn(step)
        idx = batches[step]
        loss = loss_fn(model, x[idx], y[idx])
        if not torch.isfinite(loss):
            losses.extend([float("nan")] * (steps - step))
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, model, loss)
        bar.update()
    bar.close()
    return losses
