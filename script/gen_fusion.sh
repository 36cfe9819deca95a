#!/usr/bin/env bash
# Stage 1: multi-scale attention fusion (fused maps, PNGs, prototypes, evaluation).
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/gen_fusion.sh [key=value ...]
# Inputs:  the stage-0 model (fusion.checkpoint, default <work_dir>/train_cls/final.pth), the images of
#          fusion.list (default data.train_list); masks of fusion.eval_list when they exist
# Outputs: <work_dir>/fusion/ config.yaml log.txt cam_npy/ cam_png/ proto_stats/ prototypes.pt overlays/
#          eval/cam_png.json
# Keys:    inference.{scales,flip,base_long,bg_method,bg_threshold}, fusion.{checkpoint,list,eval_list,
#          out_subdir}, amp, work_dir
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1: each rank takes a shard)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.gen_fusion "$@"
