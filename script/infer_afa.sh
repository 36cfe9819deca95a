#!/usr/bin/env bash
# AFA inference: multi-scale x flip segmentation by a trained AFA network, the dense CRF, palette PNGs and the
# evaluation (the stage-4 inference path; docs/afa.md).
#
# Usage:   CONFIG=voc12 bash script/infer_afa.sh [key=value ...]
# Inputs:  infer_afa.checkpoint (default <work_dir>/train_afa/final.pth), the images of infer_afa.list (default
#          data.val_list), its masks for the evaluation when present
# Outputs: <work_dir>/<infer_afa.out_subdir>/ (default infer_afa/): seg_png/, crf_png/, overlays/, eval/,
#          speed.json
# Keys:    infer_afa.{checkpoint,list,eval_list,scales,flip,base_long,resize,batch_size,crf,gauss_sxy,gauss_compat,
#          bi_sxy,bi_srgb,bi_compat,iterations,crf_workers,overlays}
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.infer_afa "$@"
