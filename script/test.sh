#!/usr/bin/env bash
# The tests: pytest from the repository root (tests/, see setup.cfg), with any arguments passed on to pytest.
# On a fresh clone it first sets up .venv (see Python below). Tests that need the real data sets in ../shared
# skip with a reason when it is absent.
#
# Usage:   bash script/test.sh [pytest arguments ...]
#          e.g. bash script/test.sh -x -q tests/test_scripts.py, bash script/test.sh -k crf
# Inputs:  tests/; ../shared/data (optional, SMAF_SHARED moves it)
# Outputs: pytest's report on stdout; the exit status is pytest's (5 = no tests collected)
# Keys:    pytest's own options: .venv/bin/python -m pytest --help
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
bootstrap_python
exec "$PYTHON" -m pytest "$@"
