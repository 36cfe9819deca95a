#!/usr/bin/env bash
# Real-data benchmark: the whole pipeline on the Oxford-IIIT Pet subset (VOC layout), every stage measured.
# Stage 0 on train (plain CAM loss: no saliency maps exist), stage 1 single- and multi-scale on train and val,
# stage 2 with denoising off and on, stage 3 on train and val (+ CRF for the default setting). Prints the
# mIoU table (train = pseudo-mask quality) under the config's background rule (per-image Otsu, GT-free) and,
# for comparison, at the fixed 0.20, with the thresholds used and each stage's wall time; writes
# work_dirs/pets/{summary.md,summary.json,figure.jpg}.
# Usage: PETS_ROOT=../shared/data/pets bash script/bench_pets.sh [key=value ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
PETS_ROOT="${PETS_ROOT:-../shared/data/pets}"
if [ ! -d "$PETS_ROOT/JPEGImages" ]; then
  echo "error: Pet subset not found at '$PETS_ROOT': set PETS_ROOT to the folder holding JPEGImages/ (see dataset/README.md)" >&2
  exit 2
fi
LISTS="$PETS_ROOT/ImageSets/Segmentation"
"$PYTHON" -m smaf.pipeline --config pets --denoise both data.root="$PETS_ROOT" \
  data.train_list="$LISTS/train.txt" data.infer_list="$LISTS/train.txt" data.val_list="$LISTS/val.txt" "$@"
