"""Ratios, targets, the printed table, the JSON file and the plot of a benchmark run."""
import json

# Targets from issue 6. CPU: bnlib fwd+bwd within 1.25x of native; the compact NumPy backward
# 2x faster than the staged one at (100, 500) and faster everywhere. CUDA: no slower than
# native, and >= 80% of the measured copy bandwidth on tensors of 256 MB and more.
CPU_MAX_RATIO = 1.25
CUDA_MAX_RATIO = 1.0
STAGED_SPEEDUP_AT_SMALLEST = 2.0
SMALLEST_2D = [100, 500]
CUDA_MIN_FRACTION = 0.8
BIG_TENSOR_BYTES = 256 * 2**20


def ratio(seconds, baseline_seconds):
    """Time relative to a baseline from the same run: < 1 means faster than the baseline."""
    if baseline_seconds <= 0:
        raise ValueError(f"baseline_seconds must be positive, got {baseline_seconds}")
    return seconds / baseline_seconds


def add_ratios(records, copy_bytes_per_s=None):
    """Fill ratio_to_native (torch) / speedup_over_staged (NumPy) and fraction_of_copy."""
    by_key = {(r["case"], r["device"], r["impl"], r["pass"]): r for r in records}
    for r in records:
        key = (r["case"], r["device"])
        if r["library"] == "torch":
            native = by_key[key + ("native", r["pass"])]
            r["ratio_to_native"] = ratio(r["median_s"], native["median_s"])
        if r["impl"] == "reference_compact":
            staged = by_key[key + ("reference_staged", "backward")]
            r["speedup_over_staged"] = 1.0 / ratio(r["median_s"], staged["median_s"])
        if copy_bytes_per_s:
            r["fraction_of_copy"] = r["bandwidth_gbs"] * 1e9 / copy_bytes_per_s
    return records


def check_targets(records):
    """One entry per target and case: name, case, value, threshold, met."""
    out = []
    for r in records:
        # bnlib's default path; on CUDA also its Triton path, the candidate for the default there.
        candidate = r["impl"] == "bnlib" or (r["impl"] == "bnlib_triton" and r["device"] == "cuda")
        if r["library"] == "torch" and candidate and r["pass"] == "forward+backward":
            cuda = r["device"] == "cuda"
            limit = CUDA_MAX_RATIO if cuda else CPU_MAX_RATIO
            who = r["impl"].replace("_", " ")
            out.append(_target(f"{r['device']} {who} fwd+bwd / native", r, r["ratio_to_native"],
                               limit, r["ratio_to_native"] <= limit))
            if cuda and r["bytes"] / 8 >= BIG_TENSOR_BYTES:
                out.append(_target(f"cuda {who} fwd+bwd fraction of copy bandwidth", r,
                                   r["fraction_of_copy"], CUDA_MIN_FRACTION,
                                   r["fraction_of_copy"] >= CUDA_MIN_FRACTION))
        if r["impl"] == "reference_compact":
            s = r["speedup_over_staged"]
            if r["shape"] == SMALLEST_2D:
                out.append(_target("numpy staged / compact backward", r, s,
                                   STAGED_SPEEDUP_AT_SMALLEST, s >= STAGED_SPEEDUP_AT_SMALLEST))
            out.append(_target("numpy compact faster than staged", r, s, 1.0, s > 1.0))
    return out


def _target(name, r, value, threshold, met):
    return {"target": name, "case": r["case"], "value": value, "threshold": threshold,
            "met": bool(met)}


def table(records):
    """The printed table: one line per record."""
    head = (f"{'case':28} {'impl':18} {'pass':17} {'median ms':>10} {'ratio':>6} "
            f"{'GB/s':>7} {'saved KB':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        rel = r.get("ratio_to_native", r.get("speedup_over_staged"))
        rel = "" if rel is None else f"{rel:6.2f}"
        lines.append(f"{r['case']:28} {r['impl']:18} {r['pass']:17} {r['median_s'] * 1e3:10.3f} "
                     f"{rel:>6} {r['bandwidth_gbs']:7.2f} {r['saved_extra_bytes'] / 1024:9.1f}")
    return "\n".join(lines)


def target_lines(targets):
    return [f"{'MET ' if t['met'] else 'MISS'} {t['target']:48} {t['case']:28} "
            f"{t['value']:6.2f} (threshold {t['threshold']})" for t in targets]


def write_json(path, meta, records, targets):
    with open(path, "w") as f:
        json.dump({**meta, "records": records, "targets": targets}, f, indent=1)
        f.write("\n")
    return path


def plot(result, path):
    """Left: bnlib / native time per torch case (and bnlib's Triton path where it was timed);
    right: NumPy staged / compact speedup."""
    from bnlib import plotting
    torch_rows = [r for r in result["records"]
                  if r["library"] == "torch" and r["impl"] in ("bnlib", "bnlib_triton")]
    cases = list(dict.fromkeys(r["case"] for r in torch_rows if r["impl"] == "bnlib"))
    series = [("bnlib", "forward"), ("bnlib", "forward+backward")]
    if any(r["impl"] == "bnlib_triton" for r in torch_rows):
        series.append(("bnlib_triton", "forward+backward"))
    height = 0.8 / len(series)
    fig, (ax1, ax2) = plotting.subplots(1, 2, figsize=(12, 4.5))
    for k, (impl, pass_name) in enumerate(series):
        found = {r["case"]: r["ratio_to_native"] for r in torch_rows
                 if r["impl"] == impl and r["pass"] == pass_name}
        rows = [i for i, c in enumerate(cases) if c in found]
        label = pass_name if impl == "bnlib" else f"{pass_name}, Triton path"
        ax1.barh([i + height * k for i in rows], [found[cases[i]] for i in rows], height=height,
                 label=label, color=plotting.PALETTE[k])
    limit = CUDA_MAX_RATIO if result["device"] == "cuda" else CPU_MAX_RATIO
    ax1.axvline(1.0, color=plotting.COLORS["reference"], lw=1)
    ax1.axvline(limit, color=plotting.PALETTE[3], ls="--", lw=1.5, label=f"target {limit}x")
    ax1.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases)
    plotting.label(ax1, "bnlib time / native time (ratio, lower is better)", "case",
                   f"bnlib.functional vs torch native ({result['device']})")
    np_rows = [r for r in result["records"] if r["impl"] == "reference_compact"]
    if np_rows:
        ax2.barh(range(len(np_rows)), [r["speedup_over_staged"] for r in np_rows],
                 color=plotting.COLORS["bn"])
        ax2.axvline(STAGED_SPEEDUP_AT_SMALLEST, color=plotting.PALETTE[3], ls="--", lw=1.5,
                    label="target 2x at (100, 500)")
        ax2.axvline(1.0, color=plotting.COLORS["reference"], lw=1)
        ax2.set_yticks(range(len(np_rows)), [r["case"] for r in np_rows])
    plotting.label(ax2, "staged time / compact time (higher is better)", "case",
                   "NumPy backward: compact vs staged")
    # One legend for both panels, below them, where it covers no bar.
    handles = [h for ax in (ax1, ax2) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
    plotting.save(fig, path)
    return fig
