"""`python -m bench [--quick] [--device cpu|cuda] [--threads N]`: time, compare, write JSON and plot."""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import report
from bench.cases import cases
from bench.run import MAX_SECONDS_PER_CASE, MIN_REPEATS, run_numpy_case, run_torch_case
from bnlib import functional as BF
from bnlib import kernels
from bnlib.kernels import cpu as cpu_kernel
from bnlib.measure import MIN_SAMPLE_SECONDS, copy_bandwidth

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats (seconds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats at most (default 21, quick 3)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy reference cases")
    p.add_argument("--only", default="", help="run only cases whose name contains this text")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but torch sees no CUDA device")
    args.repeats = args.repeats or (3 if args.quick else 21)
    return args


def warm_up(device, seconds=0.5):
    """Run both torch paths on a small input for a while before the first timed case."""
    x = torch.randn(256, 64, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for fn in (torch.nn.functional.batch_norm, BF.batch_norm):
            xx = x.detach().requires_grad_()
            fn(xx, None, None, training=True).sum().backward()


def _selected(case_list, only):
    chosen = [c for c in case_list if only in c.name]
    if not chosen:
        raise SystemExit(f"--only {only!r} matches no case; names look like {case_list[0].name!r}")
    return chosen


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_meta():
    default = kernels.status("triton") != "disabled"
    with kernels.use(triton=True):
        status = kernels.status("triton")
    try:  # the installed version, without importing triton (which reads its settings then)
        from importlib.metadata import version as installed
        version = installed("triton")
    except Exception:
        version = None
    return {"status": status, "default": default, "triton": version}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtypes = ("float32", "float16", "bfloat16") if args.device == "cuda" else ("float32",)
    load_before = os.getloadavg()
    copy_bps = copy_bandwidth(args.device, nbytes=(16 if args.quick else 256) * 2**20)
    print(f"bench: device {args.device} ({device_name(args.device)}), torch threads "
          f"{torch.get_num_threads()}, repeats {args.repeats}, copy bandwidth "
          f"{copy_bps / 1e9:.1f} GB/s, load average {load_before[0]:.2f}", flush=True)
    warm_up(args.device)
    records = []
    for case in _selected(cases(args.quick, dtypes), args.only):
        records += run_torch_case(case, args.device, args.repeats)
        print(f"  {case.name}: torch done", flush=True)
    if args.device == "cpu" and not args.no_numpy:
        for case in _selected(cases(args.quick, ("float32",)), args.only):
            if case.layout == "contiguous":  # NumPy has no channels-last: one run per shape
                records += run_numpy_case(case, args.repeats)
                print(f"  {case.name}: numpy done", flush=True)
    report.add_ratios(records, copy_bps)
    targets = report.check_targets(records)
    meta = {
        "device": args.device, "device_name": device_name(args.device),
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "quick": args.quick, "repeats": args.repeats,
        "warmup": "2 untimed calls of each torch function, 1 of each NumPy one",
        "repeats_policy": (f"fewer repeats (at least {MIN_REPEATS}) where one call of every "
                           f"function of a case takes over {MAX_SECONDS_PER_CASE:g} s / repeats; "
                           "each record stores its own"),
        "sample_policy": (f"a sample is at least {MIN_SAMPLE_SECONDS * 1e3:g} ms: faster calls "
                          "are repeated back to back within it and the time divided by the count"),
        "copy_bandwidth_gbs": copy_bps / 1e9,
        "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "note": args.note,
        # bnlib's compiled CPU kernel: whether it was built, and the largest input it takes.
        "cpu_kernel": {"status": kernels.status("cpu"), "max_numel": cpu_kernel.max_numel()},
        # bnlib's Triton path (CUDA): whether it loaded, whether it is bnlib's default here.
        "triton_kernel": triton_meta(),
    }
    print(report.table(records))
    print("\n".join(report.target_lines(targets)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.device + ("-quick" if args.quick else "")
    path = report.write_json(args.out_dir / f"{stem}.json", meta, records, targets)
    fig = report.plot({**meta, "records": records}, args.out_dir / f"{stem}.png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    print(f"wrote {path} and {args.out_dir / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
