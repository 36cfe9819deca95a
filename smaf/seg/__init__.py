"""Segmentation-network inference and training pieces (stage 4), by concern, as :mod:`smaf.cam` is for CAMs:

* :mod:`.inference`: multi-scale x flip averaged class probabilities of images on the device
  (:func:`~.inference.segment_batch`) and the dataset of whole images it reads;
* :mod:`.loss`: the cross-entropy of the training step (plain or class-balanced, 255 ignored);
* :mod:`.validate`: the training stage's validator (single-scale mIoU on a list with masks);
* :mod:`.writer`: label PNGs (+ dense CRF of the probabilities, overlays) of a list of images, resumable.

The first two are re-exported here.
"""
from .inference import (
           SegImageDataset,
           segment_batch,
           segment_image,
           upsampled_probabilities,
)
from .loss import LOSSES, segmentation_loss

__all__ = ["LOSSES", "SegImageDataset", "segment_batch", "segment_image", "segmentation_loss",
           "upsampled_probabilities"]
