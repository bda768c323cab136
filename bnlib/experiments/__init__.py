"""The book's experiments: one module each, run from a chapter or from the command line.

    python -m bnlib.experiments NAME --profile quick|full --device auto --out DIR

Each experiment module defines NAME, DESCRIPTION, DATASET, PROFILES = {"quick": {...},
"full": {...}}, run(cfg, device, seed, progress) -> dict of metrics and plot(results, out_dir)
-> list of PNG paths. `run_experiment` wraps them: it records device, profile, seed, dataset
and wall time, and writes NAME-PROFILE.json plus the figures.
"""
from bnlib.experiments.common import (EXPERIMENTS, default_profile, describe, load_results,
                                      recorded_file, run_experiment)

__all__ = ["EXPERIMENTS", "default_profile", "describe", "load_results", "recorded_file",
           "run_experiment"]
