#!/usr/bin/env bash
# Dense CRF over saved pseudo masks (also run by gen_pm.sh).
# Usage: CONFIG=voc12 NUM_GPUS=1 bash script/crf.sh [key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.crf "$@"
