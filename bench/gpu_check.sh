#!/usr/bin/env bash
# Every check that needs a GPU, in one run, most valuable first, each step under its own time
# limit so that one slow step cannot starve the rest:
#   1. tests  the CUDA tests (pytest -m cuda) and the Triton kernels compiled for the GPU
#   2. bench  `python -m bench` on CUDA: bench/results/cuda.json and cuda.png
#   3. fig1   the Figure 1 experiment at full scale (covariate_shift, full profile) on CUDA,
#             then (fig1_eager) the same without CUDA graphs, not recorded
# Usage, from the repository root on a machine with a CUDA GPU and torch, triton, sympy,
# scikit-learn, matplotlib, scipy, tqdm, pytest and hypothesis installed:
#   bash bench/gpu_check.sh OUT_DIR [STEP ...]
# STEP: triton_tests cuda_tests bench fig1 fig1_eager (default: all, in that order). The
# default limits add up to 540 s, so that all of it fits one 10-minute remote command.
# OUT_DIR receives each step's log, summary.txt, bench/results/ and book/results/, which are
# copied into the checkout afterwards. bnlib runs from the tree (PYTHONPATH=.), not installed.
# Where mnist1d is missing and nothing can be downloaded, put its wheel in .whl/ first:
#   pip download --no-deps -d .whl mnist1d
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [STEP ...]}
shift
STEPS=" ${*:-triton_tests cuda_tests bench fig1 fig1_eager} "
mkdir -p "$OUT/bench/results" "$OUT/book/results"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import mnist1d" 2>/dev/null && ls .whl/mnist1d-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/bnlib-site .whl/mnist1d-*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/bnlib-site
fi
LIMIT_TESTS=${LIMIT_TESTS:-90}     # each of the two test steps
LIMIT_BENCH=${LIMIT_BENCH:-180}
LIMIT_FIG1=${LIMIT_FIG1:-120}      # with MNIST-1D's generation on a new machine (about a minute)
LIMIT_EAGER=${LIMIT_EAGER:-60}

step() {  # step NAME LIMIT_S COMMAND...: log to OUT/NAME.log, one line to summary.txt
    local name=$1 limit=$2 start rc
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
# No addopts: the project's own (nbval) need the book's packages, which a GPU image may lack.
PYTEST=(python3 -m pytest -q -o addopts=-ra -p no:cacheprovider)
step triton_tests "$LIMIT_TESTS" "${PYTEST[@]}" tests/test_kernels_triton.py tests/test_parity.py
# The files with CUDA cases (tests/bn_cases.py's DEVICES, and the CUDA graph test).
step cuda_tests "$LIMIT_TESTS" "${PYTEST[@]}" -m cuda tests/test_functional.py tests/test_nn.py \
    tests/test_training.py
step bench "$LIMIT_BENCH" python3 -m bench --device cuda --note "bench/gpu_check.sh"
[[ $STEPS == *" bench "* ]] && cp bench/results/cuda.json bench/results/cuda.png "$OUT/bench/results/"
# Recorded where the book reads it (paths in the JSON are relative to the repository root).
step fig1 "$LIMIT_FIG1" python3 -m bnlib.experiments covariate_shift --profile full \
    --device cuda --out book/results --no-progress
if [[ $STEPS == *" fig1 "* ]]; then
    cp book/results/covariate_shift-full* "$OUT/book/results/" 2>/dev/null
    python3 -c "import json; r = json.load(open('book/results/covariate_shift-full.json')); \
print('fig1 seconds', {k: round(v, 1) for k, v in r['metrics']['seconds'].items()}, \
'wall', round(r['wall_time_s'], 1))" 2>&1 | tee -a "$OUT/summary.txt"
fi
# The same without CUDA graphs, for the graphs' effect (not recorded; last, as it is optional).
step fig1_eager "$LIMIT_EAGER" env BNLIB_CUDA_GRAPHS=0 python3 -m bnlib.experiments \
    covariate_shift --profile full --device cuda --out /tmp/fig1-eager --no-progress
