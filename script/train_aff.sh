#!/usr/bin/env bash
# AffinityNet (PSA): affinity labels from a folder of CAM .npy dicts, then training with the PSA affinity loss.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/train_aff.sh [key=value ...]
# Inputs:  train_aff.cam_dir (default <work_dir>/fusion/cam_npy), the images of train_aff.train_list (default
#          data.train_list), model.backbone / model.pretrained
# Outputs: <work_dir>/<train_aff.out_subdir>/ (default train_aff/): aff_labels/, final.pth, checkpoints/,
#          log.txt, metrics.jsonl
# Keys:    train_aff.{cam_dir,train_list,label_workers,radius,crop,resize_long,jitter,optimizer,batch_size,lr,
#          weight_decay,iterations,ckpt_every,resume}, train_aff.labels.{mode,alpha_la,alpha_ha,bg_scores,
#          rule_margin,crf,...}
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_aff "$@"
