#!/usr/bin/env bash
# A2GNN (related-methods.md §8): confident seeds (from CAMs, or from boxes) -> a graph network trained per image on
# the features of a trained AffinityNet -> (+ random walk) -> dense CRF -> pseudo masks. docs/a2gnn.md.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/a2gnn.sh [key=value ...]
#          bash script/a2gnn.sh a2gnn.preset=box a2gnn.box_dir=dataset/VOC2012/Annotations
# Inputs:  a2gnn.checkpoint (default <work_dir>/train_aff/final.pth), a2gnn.cam_dir (default
#          <work_dir>/fusion/cam_npy; preset box without the walk needs none), a2gnn.box_dir (preset box:
#          <id>.txt / <id>.xml boxes, or masks = tight boxes of the GT masks), the images of data.root
# Outputs: <work_dir>/<a2gnn.out_subdir>/ (default a2gnn/): seeds/, boxes/, cam_npy/, cam_png/, overlays/,
#          eval/cam_png.json
# Keys:    a2gnn.{preset (image|box),list,eval_list,graphs_per_step,seeds.*,hidden,layers,rw_weight,crf,...},
#          a2gnn.<preset>.{epochs,lr,window_radius,gcrf_weight,rw,mil_weight}; inference.base_long
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.a2gnn "$@"
