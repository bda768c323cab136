"""`python -m bench.fold [--quick] [--out FILE]`: what folding BN into the conv before it costs in
float32 and bfloat16 (bnlib.deploy.fold_into beside torch.nn.utils.fusion, against the float64
unfolded layer) and what it saves (eval time of a small conv net, folded vs unfolded)."""
import argparse
import copy
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bench.__main__ import device_name
from bnlib.deploy import fold_into, fold_model
from bnlib.measure import time_calls

OUT = Path(__file__).resolve().parent / "results" / "fold.json"
VARIANCES = [10.0 ** k for k in range(-8, 1)]   # the channels' running variance
MEAN = 10.0          # size of the channels' mean |mu|: the output is a small difference z - mu
EPS = 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}


def channel_pair(var, mean_from, gen, c=8, k=3):
    """A float64 Conv2d -> BN whose channels have mean about MEAN and variance `var` on data().

    mean_from="input": the input is 1 + small noise, so z = W x is large with a small spread
    (the cancellation z - mu happens in the data); "bias": the input is small noise around 0 and
    the conv's bias carries the mean (the cancellation b - mu is between two parameters).
    """
    conv = nn.Conv2d(c, c, k).double()
    fan_in = c * k * k
    with torch.no_grad():
        # Entries N(1/fan_in, 1/fan_in) * ..., so that each channel's weights sum to about MEAN.
        w = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) / fan_in ** 0.5
        conv.weight.copy_(w + MEAN / fan_in)
        conv.bias.copy_(MEAN * torch.sign(torch.randn(c, generator=gen, dtype=torch.float64))
                        if mean_from == "bias" else torch.zeros(c, dtype=torch.float64))
    bn = nn.BatchNorm2d(c, eps=EPS).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.zero_()
    return conv, bn


def data(conv, var, mean_from, gen, n=16, size=12):
    """Inputs whose conv outputs have per-channel variance about var (spread of x scaled to it)."""
    spread = var ** 0.5 / conv.weight.flatten(1).norm(dim=1).mean().item()
    noise = torch.randn(n, conv.in_channels, size, size, generator=gen, dtype=torch.float64)
    return (1.0 if mean_from == "input" else 0.0) + spread * noise


def calibrate(conv, bn, x):
    """Set BN's running statistics to the exact per-channel statistics of conv(x): a trained BN."""
    with torch.no_grad():
        z = conv(x)
        bn.running_mean.copy_(z.mean((0, 2, 3)))
        bn.running_var.copy_(z.var((0, 2, 3)))
    return bn.eval()


def rel_error(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def precision_rows(quick=False, seed=0):
    """Relative error (2-norm over the output) of each way of computing bn(conv(x)) in each dtype.

    The model and input are first rounded to the dtype; the reference is float64 arithmetic on
    those same rounded values, so what is measured is the arithmetic alone.
    """
    rows = []
    for mean_from in ("input", "bias"):
        for var in (VARIANCES[::4] if quick else VARIANCES):
            gen = torch.Generator().manual_seed(seed)
            conv, bn = channel_pair(var, mean_from, gen)
            calibrate(conv, bn, data(conv, var, mean_from, gen))
            x64 = data(conv, var, mean_from, gen)
            for name, dt in DTYPES.items():
                c, b, x = copy.deepcopy(conv).to(dt), copy.deepcopy(bn).to(dt), x64.to(dt)
                # The rounded model, computed in float64 (exact to far below the dtype's roundoff).
                c64, b64 = copy.deepcopy(c).double(), copy.deepcopy(b).double()
                ref = b64(c64(x.double()))
                with torch.no_grad():
                    ys = {"unfolded": b(c(x)), "bnlib_fold": fold_into(c, b)(x),
                          "torch_fusion": fuse_conv_bn_eval(c.eval(), b)(x)}
                mu = b64.running_mean.abs().mean().item()
                std = b64.running_var.sqrt().mean().item()
                rows.append({"mean_from": mean_from, "running_var": var, "dtype": name,
                             # the condition number of z - mu: relative error ~ roundoff * it
                             "mean_over_std": mu / std,
                             "unit_roundoff": UNIT_ROUNDOFF[name],
                             **{k: rel_error(y, ref) for k, y in ys.items()}})
    return rows


def small_net(seed=0):
    """Three conv-BN-ReLU blocks (3 -> 32 -> 64 -> 64 channels, 3x3) and a linear head, trained
    BN statistics stood in for by random ones."""
    torch.manual_seed(seed)
    layers, c_in = [], 3
    for c_out, stride in ((32, 1), (64, 2), (64, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net.eval()


def speed(batch=32, repeats=21, threads=1):
    """Median eval time per batch (float32, CPU, torch.inference_mode) of the net unfolded,
    folded by bnlib.deploy.fold_model and fused by torch.fx.experimental.optimization.fuse."""
    torch.set_num_threads(threads)
    net = small_net()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    models = {"unfolded": net, "bnlib_fold": fold_model(net), "torch_fx_fuse": fx_fuse(net)}

    def call(m):
        def f():
            with torch.inference_mode():
                m(x)
        return f

    with torch.inference_mode():
        ref = net(x)
        max_diff = {k: (m(x) - ref).abs().max().item() for k, m in models.items()}
    times = time_calls([call(m) for m in models.values()], repeats, warmup=2)
    seconds = dict(zip(models, times))
    return {"input": [batch, 3, 32, 32], "dtype": "float32", "torch_threads": threads,
            "repeats": repeats, "median_s": seconds,
            "speedup_over_unfolded": {k: seconds["unfolded"] / t for k, t in seconds.items()},
            "max_abs_diff_to_unfolded": max_diff}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.fold", description=__doc__)
    p.add_argument("--quick", action="store_true", help="3 variances, 3 timed repeats (seconds)")
    p.add_argument("--out", type=Path, default=OUT, help=f"results JSON (default {OUT.name})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    load = os.getloadavg()[0]
    rows = precision_rows(quick=args.quick)
    timing = speed(repeats=3 if args.quick else 21, threads=args.threads)
    meta = {"device": "cpu", "device_name": device_name("cpu"), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "quick": args.quick,
            "eps": EPS, "mean": MEAN, "load_average_before": load,
            "load_average_after": os.getloadavg()[0],
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for r in rows:
        print(f"{r['mean_from']:5s} var {r['running_var']:7.0e} {r['dtype']:8s} "
              f"|mu|/std {r['mean_over_std']:8.3g}  unfolded {r['unfolded']:8.2e}  "
              f"bnlib {r['bnlib_fold']:8.2e}  torch {r['torch_fusion']:8.2e}")
    print("speed-up over unfolded:", {k: round(v, 3) for k, v in
                                       timing["speedup_over_unfolded"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "precision": rows, "speed": timing},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
