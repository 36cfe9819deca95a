#!/usr/bin/env bash
# Stage 2: self-training with fused maps (EMA teacher, prototype denoising switch).
# Usage: CONFIG=voc12 NUM_GPUS=1 bash script/train_fusion.sh [key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_fusion "$@"
