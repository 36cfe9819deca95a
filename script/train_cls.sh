#!/usr/bin/env bash
# Stage 0: train the initial classifier (EPS loss with saliency, or plain CAM).
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/train_cls.sh [key=value ...]
# Inputs:  data.root images, data.cls_labels, data.train_list (+ data.val_list for validation mIoU);
#          data.saliency_dir maps for train_cls.method=eps (script/saliency.sh makes them)
# Outputs: <work_dir>/train_cls/ config.yaml log.txt metrics.jsonl final.pth checkpoints/iter_*.pth
# Keys:    train_cls.method (eps | cam | seam | ppc | sc_cam: docs/seed_methods.md; sc_cam runs all of its rounds,
#          as script/sc_cam.sh), train_cls.{iterations,batch_size,lr,crop,optimizer,resume},
#          train_cls.eps.{tau,lam}, model.{backbone,pretrained}, amp, work_dir, train_cls.out_subdir
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1 launches torchrun DDP)
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_cls "$@"
