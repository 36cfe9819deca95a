#!/usr/bin/env bash
# Stage 0 with SC-CAM: all sub-category rounds (extract features -> k-means per class -> retrain), then the last
# round's model as <work_dir>/train_cls/final.pth, which stage 1 (script/gen_fusion.sh) reads as any method's.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/sc_cam.sh [key=value ...]
# Inputs:  data.root images, data.cls_labels, data.train_list (+ data.val_list for validation mIoU);
#          train_cls.sc_cam.initial_checkpoint (round 0's feature extractor; '' = train a plain cam classifier)
# Outputs: <work_dir>/train_cls/round_<r>/ (a stage-0 folder each, + subcategory_labels.npz), final.pth,
#          rounds.json, log.txt
# Resume:  run it again: finished rounds are skipped, an interrupted round resumes from its checkpoints
#          (train_cls.resume=auto); train_cls.resume=none trains every round again.
# Keys:    train_cls.sc_cam.{rounds,num_subcategories,loss_weight,kmeans_seed,initial_checkpoint},
#          train_cls.{iterations,batch_size,lr,crop,optimizer}, model.{backbone,pretrained}, work_dir
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1 launches torchrun DDP)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_cls train_cls.method=sc_cam "$@"
