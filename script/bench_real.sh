#!/usr/bin/env bash
# Real-data benchmark of one set: pets (Oxford-IIIT Pet, 3 breeds) or msrc (MSRC-v2, 12 VOC classes). Runs the
# saliency step, then for each stage-0 path (the plain cam loss, and the eps loss on the saliency maps) stages
# 0-3 with the config's stage-2 setting and the CRF, and the baselines (single-scale CAM, saliency x image
# label); prints one table (train = pseudo-mask quality, val) with every stage's wall time. Lean mode on a
# 2-core CPU (README, Results): Pet 31 min, MSRC 29 min (AMD EPYC); 44 and 35 min on a throttled Intel Xeon.
# --full adds stage 2 with denoising on (its masks without CRF), the refiner rows (PAR; AffinityNet + random walk
# + CRF) and stage 4 (--segmentation).
#
# Usage:   bash script/bench_real.sh pets|msrc [--full] [key=value ...]
# Inputs:  ../shared/data/pets or ../shared/data/msrc (PETS_ROOT / MSRC_ROOT override): JPEGImages/,
#          SegmentationClass/, cls_labels.npy, ImageSets/Segmentation/{train,val}.txt
# Outputs: work_dirs/<set>/ (<method>/ stage folders), summary.md, summary.json, figure.jpg; the table on stdout
# Keys:    any key=value overrides smaf/configs/<set>.yaml, e.g. work_dir=runs/pets train_cls.iterations=200
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
SET="${1:-}"
case "$SET" in
  pets) ROOT="${PETS_ROOT:-../shared/data/pets}" ;;
  msrc) ROOT="${MSRC_ROOT:-../shared/data/msrc}" ;;
  *) echo "usage: bash script/bench_real.sh pets|msrc [key=value ...]   (--help for more)" >&2; exit 2 ;;
esac
shift
EXTRA=(--denoise default)
if [ "${1:-}" = "--full" ]; then
  EXTRA=(--denoise both --refiners par,rw --segmentation)
  shift
fi
if [ ! -d "$ROOT/JPEGImages" ]; then
  echo "error: the $SET set was not found at '$ROOT': put ../shared beside the repository or set ${SET^^}_ROOT to the folder holding JPEGImages/ (see dataset/README.md)" >&2
  exit 2
fi
LISTS="$ROOT/ImageSets/Segmentation"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
bootstrap_python
"$PYTHON" -m smaf.pipeline --config "$SET" --methods cam,eps "${EXTRA[@]}" --baselines data.root="$ROOT" \
  data.train_list="$LISTS/train.txt" data.infer_list="$LISTS/train.txt" data.val_list="$LISTS/val.txt" "$@"
