"""Command line: python -m bnlib.experiments NAME --profile quick|full --device auto --out DIR."""
import argparse
import json
import sys

from bnlib.experiments.runner import EXPERIMENTS, describe, module, run_experiment


def main(argv=None):
    listing = "\n".join(f"  {name:22s}{describe(name)}" for name in EXPERIMENTS)
    parser = argparse.ArgumentParser(
        prog="python -m bnlib.experiments",
        description="Run one of the book's experiments; writes NAME-PROFILE.json and PNG figures.",
        epilog="experiments:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME",
                        help="which experiment (listed below)")
    parser.add_argument("--profile", choices=["quick", "full"], default=None,
                        help="quick: small, CPU, seconds to a minute; full: paper scale, for a GPU "
                             "(default: $BNLIB_PROFILE, else full on CUDA and quick on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument("--out", default="results", help="output folder (default ./results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="replace one setting of the profile, VALUE in JSON (repeatable), "
                             "e.g. sync_bn --set 'world_sizes=[2, 4]'")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {key}: VALUE must be JSON (e.g. 3, 0.1, [2, 4], \"digits\"), got {value!r}")
    known = set().union(*(module(args.name).PROFILES[p] for p in ("quick", "full")))
    if set(overrides) - known:
        parser.error(f"--set: {args.name} has no setting {sorted(set(overrides) - known)}; "
                     f"its settings: {sorted(known)}")
    results = run_experiment(args.name, profile=args.profile, device=args.device, seed=args.seed,
                             out_dir=args.out, progress=not args.no_progress, **overrides)
    print(f"{args.name} ({results['profile']}, {results['device_name']}): "
          f"{results['wall_time_s']:.1f} s; wrote {results['json_path']}", file=sys.stderr)
    for p in results["figures"]:
        print(f"  figure: {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
