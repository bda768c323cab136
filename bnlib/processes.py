"""Run one function on N local processes joined by torch.distributed (gloo), bounded in time.

`run_ranks(fn, world_size, args)` spawns world_size processes, each with an initialised process
group (gloo, file:// rendezvous in a temporary folder, so no port is needed), calls
fn(rank, world_size, *args) in each and returns their results in rank order. A rank that raises
makes run_ranks raise; a collective that hangs times out (the group's timeout) and a run that
outlives timeout_s is killed: neither can hang a test run or a chapter. fn must be importable by
name (a module-level function), as spawn requires.
"""
import datetime
import tempfile
import time
from pathlib import Path

import torch


def _worker(rank, fn, world_size, folder, args, timeout_s, threads):
    import torch.distributed as dist
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=max(1.0, timeout_s / 2)))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size, args=(), timeout_s=60.0, threads=1):
    """[fn(0, world_size, *args), ..., fn(world_size - 1, ...)], each run in its own process.

    timeout_s bounds the whole run (collectives time out after half of it); threads is each
    process's torch CPU thread count. Results travel back through torch.save files.
    """
    import torch.multiprocessing as mp
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    with tempfile.TemporaryDirectory(prefix="bnlib-ranks-") as folder:
        ctx = mp.start_processes(_worker, args=(fn, world_size, folder, tuple(args), timeout_s,
                                                threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_ranks: {world_size} processes running "
                                       f"{getattr(fn, '__name__', fn)} took more than "
                                       f"{timeout_s} s; killed")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]

