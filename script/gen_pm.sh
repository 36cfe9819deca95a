#!/usr/bin/env bash
# Stage 3: pseudo masks with the self-trained model, then dense CRF, then evaluation.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/gen_pm.sh [key=value ...]
# Inputs:  the stage-2 model (pseudo_masks.checkpoint, default <work_dir>/train_fusion/final.pth), the images
#          of pseudo_masks.list (default data.train_list); masks of pseudo_masks.eval_list when they exist
# Outputs: <work_dir>/pseudo_masks/ config.yaml log.txt cam_npy/ cam_png/ crf_png/ overlays/
#          eval/{cam_png,crf_png}.json
# Keys:    inference.*, pseudo_masks.{crf,checkpoint,list,eval_list,out_subdir}, crf.workers, crf.* constants
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1: each rank takes a shard)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.gen_pm "$@"
