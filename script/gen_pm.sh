#!/usr/bin/env bash
# Stage 3: pseudo masks with the self-trained model, then dense CRF, then evaluation.
# Usage: CONFIG=voc12 NUM_GPUS=1 bash script/gen_pm.sh [key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.gen_pm "$@"
