#!/usr/bin/env bash
# AFA (Affinity from Attention, CVPR 2022) end to end, single stage: classifier, affinity from the transformer's
# attention and the segmentation decoder trained together from image-level labels (docs/afa.md).
#
# Usage:   CONFIG=voc12 NUM_GPUS=2 bash script/train_afa.sh [key=value ...]
# Inputs:  the images and image-level labels of train_afa.train_list (default data.train_list),
#          train_afa.backbone (mit_b0..mit_b5 | vit_s14_focus), train_afa.pretrained (VOC: weights/mit_b1.pth)
# Outputs: <work_dir>/<train_afa.out_subdir>/ (default train_afa/): final.pth, checkpoints/, log.txt,
#          metrics.jsonl, config.yaml
# Keys:    train_afa.{train_list,backbone,pretrained,output_stride,attention_blocks,decoder_dim,crop,scale_range,
#          flip,jitter,cam_scales,bg_high,bg_low,radius,cam_iters,propagate_iters,seg_weight,aff_weight,optimizer,
#          batch_size,lr,weight_decay,iterations,ckpt_every,val_every,val_max_images,log_every,resume},
#          train_afa.adamw.{warmup_iters,warmup_ratio,power,head_lr_mult}, par.* (PAR constants)
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_afa "$@"
