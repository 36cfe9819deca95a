#!/usr/bin/env bash
# Real-data benchmark of one set: pets (Oxford-IIIT Pet, 3 breeds) or msrc (MSRC-v2, 12 VOC classes), read from
# ../shared/data (PETS_ROOT / MSRC_ROOT override). Runs the saliency step, then for each stage-0 path (the plain
# cam loss and the eps loss on the saliency maps) stages 0-3 with stage 2 denoising off and on, the CRF for the
# default setting, and the baselines (single-scale CAM, saliency x image label); prints one table (train =
# pseudo-mask quality, val) with every stage's wall time; writes work_dirs/<set>/{summary.md,summary.json,figure.jpg}.
# Usage: bash script/bench_real.sh pets|msrc [key=value ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
SET="${1:-}"
case "$SET" in
  pets) ROOT="${PETS_ROOT:-../shared/data/pets}" ;;
  msrc) ROOT="${MSRC_ROOT:-../shared/data/msrc}" ;;
  *) echo "usage: bash script/bench_real.sh pets|msrc [key=value ...]" >&2; exit 2 ;;
esac
shift
if [ ! -d "$ROOT/JPEGImages" ]; then
  echo "error: the $SET set was not found at '$ROOT': put ../shared beside the repository or set ${SET^^}_ROOT to the folder holding JPEGImages/ (see dataset/README.md)" >&2
  exit 2
fi
LISTS="$ROOT/ImageSets/Segmentation"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"$PYTHON" -m smaf.pipeline --config "$SET" --methods cam,eps --denoise both --baselines data.root="$ROOT" \
  data.train_list="$LISTS/train.txt" data.infer_list="$LISTS/train.txt" data.val_list="$LISTS/val.txt" "$@"
