#!/usr/bin/env bash
# Fault test: kills every stage with SIGKILL at random points and checks that the resumed outputs equal an uninterrupted run.
# It runs tests/test_faults.py (pytest marker `faults`; plain `pytest` and CI run one round of it) on the
# tiny synthetic set it generates: the chain stage 0 -> 1 -> 2 -> 3 (+ CRF) -> CRF step, once uninterrupted,
# then ROUNDS times with each stage started as a process, killed KILLS times after a random delay and run
# to the end; every file of every stage must equal the uninterrupted run's (docs/faults.md).
#
# Usage:   bash script/faults.sh [pytest arguments ...]
#          e.g. ROUNDS=5 KILLS=3 bash script/faults.sh, SEED=102714 bash script/faults.sh -x
# Inputs:  nothing (the synthetic set is generated under pytest's temporary folder)
# Outputs: pytest's report; each stage's kill points are printed (seed, delay, files left at the kill)
# Keys:    ROUNDS (default 3), KILLS per stage (default 2), SEED (default random), WORKERS (DataLoader
#          workers, default 0); pytest's own options
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
bootstrap_python
export SMAF_FAULT_ROUNDS="${ROUNDS:-3}" SMAF_FAULT_KILLS="${KILLS:-2}" SMAF_FAULT_WORKERS="${WORKERS:-0}"
if [ -n "${SEED:-}" ]; then
  export SMAF_FAULT_SEED="$SEED"
fi
exec "$PYTHON" -m pytest -n 0 -m faults -s -q tests/test_faults.py "$@"   # -n 0: -s needs one process
