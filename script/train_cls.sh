#!/usr/bin/env bash
# Stage 0: train the initial classifier (EPS loss with saliency, or plain CAM).
# Usage: CONFIG=voc12 NUM_GPUS=1 bash script/train_cls.sh [key=value ...]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_cls "$@"
