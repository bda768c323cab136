"""What every experiment shares: the registry, profiles, devices, seeding, offline data, results files."""
import contextlib
import importlib
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

# name -> module. Order is the book's order.
EXPERIMENTS = {
    "covariate_shift": "bnlib.experiments.covariate_shift",
    "noisy_bn": "bnlib.experiments.noisy_bn",
    "inference_stats": "bnlib.experiments.inference_stats",
    "variance_correction": "bnlib.experiments.variance_correction",
    "gradients": "bnlib.experiments.gradients",
}
PROFILES = ("quick", "full")


def module(name):
    if name not in EXPERIMENTS:
        raise ValueError(f"name must be one of {sorted(EXPERIMENTS)}, got {name!r}")
    return importlib.import_module(EXPERIMENTS[name])


def describe(name):
    """The experiment's one-line description (or why it cannot be loaded yet)."""
    try:
        return module(name).DESCRIPTION
    except ModuleNotFoundError as err:
        if err.name != EXPERIMENTS[name]:  # a missing dependency is a real error
            raise
        return "(not available: module not written yet)"


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
def cpu_threads(device, threads=None):
    """On CPU, run the block with $BNLIB_THREADS torch threads (default 1), then restore.

    The experiments' models are small: one thread avoids the synchronisation cost of several
    (about 30x per step on a busy 2-core machine) and keeps reductions in one fixed order.
    """
    if not str(device).startswith("cpu"):
        yield
        return
    threads = threads or int(os.environ.get("BNLIB_THREADS", "1"))
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
    With out_dir, writes out_dir/NAME-PROFILE.json and the experiment's PNG figures there.
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
    with cpu_threads(device):
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
        "dataset": cfg.get("dataset", mod.DATASET),  # a profile may pick another dataset
        "config": cfg,
        "wall_time_s": wall_time,
        "metrics": metrics,
        "figures": [],
        "json_path": None,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results["figures"] = [str(p) for p in mod.plot(results, out)]
        path = out / f"{name}-{profile}.json"
        results["json_path"] = str(path)
        path.write_text(json.dumps(results, indent=1, default=_jsonable))
    return results


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.tolist()
    raise TypeError(f"cannot store {type(v).__name__} in results JSON")


# The book's repository (the same as _config.yml's; tests/test_packaging.py checks it).
REPOSITORY, BRANCH = "https://github.com/bnbook/batchnorm-book", "main"


def _checkout_root(start):
    """The book's repository root at or above `start` (it has _toc.yml and bnlib/), or None."""
    for folder in (Path(start).resolve(), *Path(start).resolve().parents):
        if (folder / "_toc.yml").is_file() and (folder / "bnlib").is_dir():
            return folder
    return None


def recorded_file(relpath, start="."):
    """A file recorded in the repository, e.g. "bench/results/cpu.json" or "book/results/X.json".

    Inside a checkout (the book build, CI, a clone) it is read from there, and a file the
    checkout lacks is simply absent: None, with no network access. Elsewhere (Colab installs
    only bnlib) it is downloaded once from the repository into ~/.cache/bnlib. Returns its Path,
    or None where it cannot be had.
    """
    root = _checkout_root(start)
    if root is not None:
        return root / relpath if (root / relpath).is_file() else None
    cached = Path.home() / ".cache" / "bnlib" / relpath
    if not cached.is_file():
        import urllib.error
        import urllib.request
        url = REPOSITORY.replace("github.com", "raw.githubusercontent.com") + f"/{BRANCH}/{relpath}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                data = response.read()
        except (urllib.error.URLError, OSError):
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(data)
    return cached


def load_results(path):
    """Read a results JSON written by run_experiment (e.g. a recorded full-profile GPU run)."""
    return json.loads(Path(path).read_text())


# --- offline data --------------------------------------------------------------------------

def _mnist1d(seed, num_samples):
    """MNIST-1D's signals and labels (train then test), generated, or read from the cache.

    The cache file is named by everything the generator depends on (the mnist1d version, the
    seed and the sample count), and written whole under a temporary name first, so a run killed
    while writing leaves no partial file behind.
    """
    from importlib.metadata import version
    from mnist1d.data import get_dataset_args, make_dataset
    from bnlib import cache_dir
    args = get_dataset_args()
    args.seed = seed
    if num_samples is not None:
        args.num_samples = num_samples
    path = cache_dir() / "mnist1d" / f"v{version('mnist1d')}-seed{seed}-n{args.num_samples}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["x"], f["y"]
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]])
    y = np.concatenate([data["y"], data["y_test"]])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, path)
    except OSError:  # a read-only home: generate again next time
        pass
    return x, y


DATASETS = ("digits", "mnist1d")


def load_dataset(name="digits", seed=0, device="cpu", test_fraction=0.25, num_samples=None):
    """Load a dataset that needs no download; standardized features, float32 tensors on device.

    digits: scikit-learn's 1,797 handwritten 8x8 digits (64 features, 10 classes).
    mnist1d: MNIST-1D (Greydanus 2020), generated locally by the mnist1d package (40 features,
    10 classes); num_samples sets how many are generated (default 5,000). Generating is slow
    (about 50 s for the full profile's 70,000 on one CPU core), so each set is generated once
    per machine and cached (see _mnist1d).
    Returns (x_train, y_train, x_test, y_test).
    """
    if name == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
    elif name == "mnist1d":
        x, y = _mnist1d(seed, num_samples)
    else:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order].astype(np.float64), y[order].astype(np.int64)
    n_test = int(round(test_fraction * len(x)))
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return (as_t((x_train - mean) / std, torch.float32), as_t(y_train, torch.long),
            as_t((x_test - mean) / std, torch.float32), as_t(y_test, torch.long))
