#!/usr/bin/env bash
# The real-data benchmark on the Oxford-IIIT Pet subset: bash script/bench_real.sh pets (kept for old commands).
#
# Usage:   bash script/bench_pets.sh [key=value ...]
# Inputs:  ../shared/data/pets (PETS_ROOT overrides)
# Outputs: work_dirs/pets/ stage folders, summary.md, summary.json, figure.jpg; the table on stdout
# Keys:    any key=value overrides smaf/configs/pets.yaml (see bash script/bench_real.sh --help)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exec bash "$REPO_ROOT/script/bench_real.sh" pets "$@"
