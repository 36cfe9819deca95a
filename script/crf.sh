#!/usr/bin/env bash
# Dense CRF over saved pseudo masks, as its own step (gen_pm.sh also runs it): any folder of label PNGs + images.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/crf.sh [key=value ...]
# Inputs:  crf.input_dir (default <work_dir>/pseudo_masks/cam_png), the images of data.root; masks of
#          crf.eval_list when they exist
# Outputs: crf.output_dir (default <input_dir>/../crf_png), overlays/, eval/crf_png.json
# Keys:    crf.{input_dir,output_dir,workers,gt_prob,gauss_sxy,gauss_compat,bi_sxy,bi_srgb,bi_compat,
#          iterations}
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.crf "$@"
