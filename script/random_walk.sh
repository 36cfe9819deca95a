#!/usr/bin/env bash
# Random walk (PSA) of any folder of CAM .npy dicts with a trained AffinityNet, on the device.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/random_walk.sh [key=value ...]
# Inputs:  random_walk.checkpoint (default <work_dir>/train_aff/final.pth), random_walk.cam_dir (default
#          <work_dir>/fusion/cam_npy), the images of data.root; masks of random_walk.eval_list when they exist
# Outputs: <work_dir>/<random_walk.out_subdir>/ (default random_walk/): cam_npy/ (walked maps), cam_png/,
#          overlays/, eval/cam_png.json
# Keys:    random_walk.{checkpoint,cam_dir,list,eval_list,preset (psa|seam|ppc|smaf),radius,propagation},
#          random_walk.<preset>.{beta,logt,bg,alpha,bg_threshold}; inference.{base_long,bg_method,bg_threshold}
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.random_walk "$@"
