#!/usr/bin/env bash
# Stage 2: self-training with fused maps (EMA teacher, prototype denoising switch).
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/train_fusion.sh [key=value ...]
# Inputs:  the stage-0 model (train_fusion.checkpoint), the stage-1 folder (train_fusion.fusion_dir: its
#          cam_npy/ and prototypes.pt), the images of data.train_list
# Outputs: <work_dir>/train_fusion/ config.yaml log.txt metrics.jsonl final.pth final_teacher.pth checkpoints/
# Keys:    train_fusion.{denoise,iterations,batch_size,lr,crop,ema,loss_weight,bg_score,resume},
#          train_fusion.{checkpoint,fusion_dir,out_subdir}, amp, work_dir
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1 launches torchrun DDP)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_fusion "$@"
