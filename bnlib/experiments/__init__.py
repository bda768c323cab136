"""The book's experiments: one module each, run from a chapter or from the command line.

    python -m bnlib.experiments NAME --profile quick|full --device auto --out DIR

runner.py holds the registry and the contract every experiment module keeps (NAME,
DESCRIPTION, PROFILES, run, figures) and does everything around a run: device, profile,
threads, seed, the results JSON and the figure files. What the experiments share: data.py
(offline datasets), models.py, training.py (the one SGD loop), metrics.py, bn_stats.py (probes
of BN layers' statistics). Chapters use bnlib.chapter on top of these.
"""
from bnlib.experiments.runner import (EXPERIMENTS, default_profile, describe, load_results,
                                      run_experiment)

__all__ = ["EXPERIMENTS", "default_profile", "describe", "load_results", "run_experiment"]
