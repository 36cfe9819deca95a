#!/usr/bin/env bash
# Stage 1: multi-scale attention fusion (fused maps, PNGs, prototypes, evaluation).
# Usage: CONFIG=voc12 NUM_GPUS=1 bash script/gen_fusion.sh [key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.gen_fusion "$@"
