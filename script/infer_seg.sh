#!/usr/bin/env bash
# Stage 4 inference: multi-scale x flip segmentation of a list, optional dense CRF, overlays and evaluation.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/infer_seg.sh [key=value ...]
# Inputs:  infer_seg.checkpoint (default <work_dir>/train_seg/final.pth), the images of infer_seg.list (default
#          data.val_list); masks of infer_seg.eval_list when they exist
# Outputs: <work_dir>/<infer_seg.out_subdir>/ (default infer_seg/): seg_png/, crf_png/ (with the CRF), overlays/,
#          eval/{seg_png,crf_png}.json, speed.json
# Keys:    infer_seg.{checkpoint,list,eval_list,scales,flip,base_long,resize,batch_size,crf,crf_workers,
#          gauss_sxy,gauss_compat,bi_sxy,bi_srgb,bi_compat,iterations,overlays}
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.infer_seg "$@"
