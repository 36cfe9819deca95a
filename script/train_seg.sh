#!/usr/bin/env bash
# Stage 4: train the segmentation network (DeepLab-v2 or -LargeFOV) on the pseudo masks, or on the ground truth.
#
# Usage:   CONFIG=voc12 NUM_GPUS=1 bash script/train_seg.sh [key=value ...]
# Inputs:  train_seg.mask_dir (default <work_dir>/pseudo_masks/crf_png; any folder of label PNGs, 255 ignored) or
#          the dataset's masks (train_seg.masks=gt), the images of train_seg.train_list (default data.train_list),
#          model.backbone / model.output_stride, train_seg.pretrained (default model.pretrained)
# Outputs: <work_dir>/<train_seg.out_subdir>/ (default train_seg/): final.pth, checkpoints/, log.txt,
#          metrics.jsonl
# Keys:    train_seg.{masks,mask_dir,train_list,arch,pretrained,dilations,crop,base_long,scale_range,flip,loss,
#          optimizer,batch_size,lr,weight_decay,iterations,ckpt_every,val_every,val_max_images,resume},
#          train_seg.poly_sgd.{momentum,power}
# Environment: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
run_stage smaf.stages.train_seg "$@"
