"""The experiments' registry and runner: profiles, devices, threads, seeds, results files.

Every experiment module keeps one contract (checked by `module`):

    NAME         its name in EXPERIMENTS
    DESCRIPTION  one line for `python -m bnlib.experiments --help`
    PROFILES     {"quick": config, "full": config}, each config a dict with a "dataset" key
    run(config, device, seed, progress) -> metrics (a JSON-serialisable dict)
    figures(results) -> {part: matplotlib Figure}, results being what run_experiment returns

Everything around that is here, in one place: which device and profile, how many CPU threads,
the seed, the results JSON, and the figures' file names (NAME-PROFILE-part.png), saving and
closing them.
"""
import contextlib
import importlib
import json
import os
import platform
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

# name -> module. Order is the book's order.
EXPERIMENTS = {
    "covariate_shift": "bnlib.experiments.covariate_shift",
    "noisy_bn": "bnlib.experiments.noisy_bn",
    "inference_stats": "bnlib.experiments.inference_stats",
    "small_batches": "bnlib.experiments.small_batches",
    "variance_correction": "bnlib.experiments.variance_correction",
    "sync_bn": "bnlib.experiments.sync_bn",
    "gradients": "bnlib.experiments.gradients",
    "convnet": "bnlib.experiments.convnet",
    "residual": "bnlib.experiments.residual",
    "regularisation": "bnlib.experiments.regularisation",
}
PROFILES = ("quick", "full")
CONTRACT = ("NAME", "DESCRIPTION", "PROFILES", "run", "figures")
PART = re.compile(r"[a-z0-9_]+")  # a figure part's name, as it appears in the file name


def module(name):
    """The experiment module called `name`, checked against the contract above."""
    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    mod = importlib.import_module(EXPERIMENTS[name])
    missing = [k for k in CONTRACT if not hasattr(mod, k)]
    if missing or mod.NAME != name or set(mod.PROFILES) != set(PROFILES):
        raise TypeError(f"{mod.__name__} does not keep the experiment contract: missing "
                        f"{missing}, NAME {getattr(mod, 'NAME', None)!r}, profiles "
                        f"{sorted(getattr(mod, 'PROFILES', {}))} (want {list(PROFILES)})")
    return mod


def describe(name):
    """The experiment's one-line description."""
    return module(name).DESCRIPTION


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when available, else 'cpu'. An explicit cuda without a GPU is an error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but no CUDA device is available")
    return str(dev)


def default_profile(device="auto"):
    """$BNLIB_PROFILE if set, else full on CUDA and quick on CPU."""
    env = os.environ.get("BNLIB_PROFILE")
    if env:
        if env not in PROFILES:
            raise ValueError(f"BNLIB_PROFILE must be one of {PROFILES}, got {env!r}")
        return env
    return "full" if resolve_device(device).startswith("cuda") else "quick"


def device_name(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"cpu ({platform.machine()}, {n} thread{'' if n == 1 else 's'})"


def seed_everything(seed):
    """Seed Python, NumPy and torch; deterministic kernels where torch has them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def cpu_threads(threads=None):
    """Run the block with $BNLIB_THREADS torch CPU threads (default 1), then restore.

    On any device: the experiments' models are small, and one thread avoids the
    synchronisation cost of several (about 30x per step on a busy 2-core machine) and keeps
    reductions in one fixed order; on CUDA the CPU's share (statistics in NumPy, the host side
    of each step) is small too.
    """
    threads = threads if threads is not None else os.environ.get("BNLIB_THREADS", "1")
    try:
        threads = int(threads)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"BNLIB_THREADS must be a positive int, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_experiment(name, profile=None, device="auto", seed=0, out_dir=None, progress=False,
                   **overrides):
    """Run experiment `name` and return its results dict (metrics plus provenance).

    overrides replace entries of the profile's configuration (for tests and sweeps).
    With out_dir, writes out_dir/NAME-PROFILE.json and the figures (see save_figures) there.
    """
    mod = module(name)
    device = resolve_device(device)
    profile = profile or default_profile(device)
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    cfg = dict(mod.PROFILES[profile])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown settings for {name}: {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    seed_everything(seed)
    with cpu_threads():
        start = time.perf_counter()
        metrics = mod.run(cfg, device=device, seed=seed, progress=progress)
        wall_time = time.perf_counter() - start
        name_of_device = device_name(device)
    results = {
        "experiment": name,
        "profile": profile,
        "device": device,
        "device_name": name_of_device,
        "torch_version": torch.__version__,
        "seed": seed,
        "dataset": cfg["dataset"],
        "config": cfg,
        "wall_time_s": wall_time,
        "metrics": metrics,
        "figures": [],
        "json_path": None,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results["figures"] = save_figures(results, out)
        path = out / f"{name}-{profile}.json"
        results["json_path"] = str(path)
        path.write_text(json.dumps(results, indent=1, default=_jsonable))
    return results


def draw(results):
    """The experiment's figures for results, drawn under the book's style: {part: Figure}.

    The caller closes them (matplotlib keeps every open figure); save_figures does.
    """
    from bnlib import plotting
    with plotting.style():
        figs = module(results["experiment"]).figures(results)
    bad = [p for p in figs if not isinstance(p, str) or not PART.fullmatch(p)]
    if bad or not figs:
        import matplotlib.pyplot as plt
        for fig in figs.values():
            plt.close(fig)
        raise ValueError(f"figures() of {results['experiment']} must return a non-empty "
                         f"{{part: Figure}} with parts made of [a-z0-9_], got parts {list(figs)}")
    return figs


def figure_path(out_dir, results, part):
    """Where a figure is written: out_dir/NAME-PROFILE-part.png (a quick run written next to a
    recorded full run never overwrites its figures)."""
    return Path(out_dir) / f"{results['experiment']}-{results['profile']}-{part}.png"


def save_figures(results, out_dir):
    """Draw, save as PNG and close every figure of results; returns the paths (str), in order."""
    import matplotlib.pyplot as plt
    from bnlib import plotting
    paths = []
    for part, fig in draw(results).items():
        paths.append(plotting.save(fig, figure_path(out_dir, results, part)))
        plt.close(fig)
    return paths


def load_results(path):
    """Read a results JSON written by run_experiment (e.g. a recorded full-profile run)."""
    return json.loads(Path(path).read_text())


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.tolist()
    raise TypeError(f"cannot store {type(v).__name__} in results JSON")
