#!/usr/bin/env bash
# PAR (AFA's pixel-adaptive refinement, training-free) over any folder of CAM .npy dicts + images.
#
# Usage:   CONFIG=voc12 bash script/par.sh [key=value ...]
# Inputs:  par.input_dir (default <work_dir>/fusion/cam_npy; e.g. pseudo_masks/cam_npy), the images of
#          data.root; masks of par.eval_list when they exist
# Outputs: <work_dir>/<par.out_subdir>/ (default par/): cam_npy/ (refined maps), cam_png/, overlays/,
#          eval/cam_png.json
# Keys:    par.{input_dir,list,eval_list,workers,dilations,iterations,app_sigma,pos_sigma,pos_weight,scale,
#          softmax}; background score: inference.{bg_method,bg_threshold}
# Environment: CONFIG (packaged name or YAML path, default voc12)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.par "$@"
