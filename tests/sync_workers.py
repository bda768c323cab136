"""What each rank runs in tests/test_sync_bn.py: every scenario in one spawn of WORLD processes
(starting processes is the slow part), results returned per scenario, references computed by
the test in one process. Inputs are drawn from the whole batch with a fixed seed and sliced by
rank, so the test can rebuild the concatenated batch exactly."""
import torch
import torch.distributed as dist

from bnlib.nn import SyncBatchNorm

WORLD = 3


def batch(seed, sizes, shape, dtype=torch.float64, offset=0.0):
    """The whole batch (sum(sizes), *shape), its upstream gradient, and each rank's slices."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = (torch.randn((n, *shape), generator=g, dtype=torch.float64) + offset).to(dtype)
    dy = torch.randn((n, *shape), generator=g, dtype=torch.float64).to(dtype)
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return x, dy, [slice(s, s + k) for s, k in zip(starts, sizes)]


def params(c, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5,
            torch.randn(c, generator=g, dtype=torch.float64).to(dtype))


CASES = {  # name: (per-rank sizes, per-example shape, momentum, steps)
    "uneven_4d": ([3, 5, 2], (4, 3, 2), 0.1, 1),
    "empty_shard_2d": ([4, 0, 3], (3,), 0.1, 1),
    "momentum_none_3d": ([2, 3, 4], (2, 5), None, 2),
    "one_per_rank": ([1, 1, 1], (2,), 0.1, 1),
}


def layer_for(c, momentum, dtype=torch.float64):
    bn = SyncBatchNorm(c, momentum=momentum, dtype=dtype)
    w, b = params(c, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    return bn


def train_case(rank, name):
    sizes, shape, momentum, steps = CASES[name]
    bn = layer_for(shape[0], momentum)
    out = []
    for step in range(steps):
        x, dy, shards = batch(10 + step, sizes, shape)
        xs = x[shards[rank]].clone().requires_grad_(True)
        y = bn(xs)
        y.backward(dy[shards[rank]])
        out.append(dict(y=y.detach(), dx=xs.grad, dweight=bn.weight.grad.clone(),
                        dbias=bn.bias.grad.clone(), grad_fn=type(y.grad_fn).__name__))
        bn.weight.grad = bn.bias.grad = None
    return dict(steps=out, running_mean=bn.running_mean.clone(),
                running_var=bn.running_var.clone(), tracked=int(bn.num_batches_tracked))


def offset_case(rank):
    """float32 at a 1e4 offset: the merged statistics against float64 truth."""
    x, _, shards = batch(3, [16, 16, 16], (4, 8), dtype=torch.float32, offset=1e4)
    bn = SyncBatchNorm(4, affine=False, momentum=1.0)
    y = bn(x[shards[rank]])
    return dict(y=y, running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())


def eval_sends_nothing(rank):
    """Rank 0 alone runs an eval forward; then every rank all-reduces its rank. Had eval sent
    anything, rank 0's collective would meet the others' all-reduce (a mismatch: an abort or a
    wrong sum) instead of the sum 0 + 1 + 2."""
    bn = layer_for(3, 0.1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64))
    bn.eval()
    y = bn(batch(5, [4] * WORLD, (3,))[0][:4]) if rank == 0 else None
    t = torch.tensor([float(rank)], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(y=y, sum=float(t))


def errors(rank):
    """Mismatched channels, mismatched dtypes, one value per channel over the group, a bad local
    input on one rank only: each must raise on every rank (no hang), and the group must still
    work afterwards."""
    got = {}
    attempts = {
        "channels": lambda: SyncBatchNorm(3 + (rank == 1), affine=False,
                                          track_running_stats=False)(torch.randn(4, 3 + (rank == 1))),
        "dtype": lambda: SyncBatchNorm(3, affine=False, track_running_stats=False)(
            torch.randn(4, 3, dtype=torch.float64 if rank == 2 else torch.float32)),
        "one_value": lambda: SyncBatchNorm(2)(torch.randn(1 if rank == 0 else 0, 2)),
        "local_check": lambda: SyncBatchNorm(3)(torch.randn(4, 4 if rank == 1 else 3)),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            got[name] = None
        except (TypeError, ValueError) as err:
            got[name] = (type(err).__name__, str(err))
    t = torch.ones(1)
    dist.all_reduce(t)
    got["after"] = float(t)
    return got


def group_of_one(rank):
    """In a process group of one the layer is plain BN (statistics of this rank's shard only)."""
    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    bn = SyncBatchNorm(3, process_group=groups[rank], dtype=torch.float64)
    x = batch(7, [5] * WORLD, (3,))[0][5 * rank:5 * rank + 5]
    return dict(x=x, y=bn(x).detach(), running_mean=bn.running_mean.clone())


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()


DDP_STEPS, DDP_PER_RANK, DDP_LR = 3, 4, 0.1


def ddp_data(step):
    g = torch.Generator().manual_seed(100 + step)
    n = DDP_PER_RANK * WORLD
    return (torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def ddp_training(rank):
    """A few SGD steps of tiny_net under DDP with SyncBatchNorm; each rank its equal shard and
    the mean loss over it (DDP averages gradients over ranks: the gradient of the global mean)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(SyncBatchNorm.convert_sync_batchnorm(tiny_net()))
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for step in range(DDP_STEPS):
        x, y = ddp_data(step)
        part = slice(rank * DDP_PER_RANK, (rank + 1) * DDP_PER_RANK)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def everything(rank, world):
    assert world == WORLD, (world, WORLD)
    out = {name: train_case(rank, name) for name in CASES}
    out["offset"] = offset_case(rank)
    out["eval"] = eval_sends_nothing(rank)
    out["errors"] = errors(rank)
    out["group_of_one"] = group_of_one(rank)
    out["ddp"] = ddp_training(rank)
    return out


def lone_collective(rank, world):
    """Rank 0 enters an all-reduce that rank 1, alive but busy for 60 s, never joins: rank 0
    must time out, not hang."""
    import time
    if rank == 0:
        dist.all_reduce(torch.ones(1))
    else:
        time.sleep(60)
    return rank
