"""Training data of the segmentation network (stage 4): images with label PNGs, and the joint transform.

Labels come from any folder of ``<id>.png`` label maps (palette or greyscale PNG of class indices: 0 background,
c+1 class c, 255 ignored), e.g. stage 3's ``crf_png/`` or another repository's pseudo masks, or from the
dataset's ground truth (``SegmentationClass(Aug)/``, the fully supervised reference).

:class:`SegTrainTransform` (DeepLab's augmentation): optional long-side resize to ``base_long``, random scale
in ``scale_range``, horizontal flip, random crop with padding; the image is resized bicubically and the label
with nearest neighbour, the padding is 0 in the normalised image (the ImageNet mean) and 255 in the label, so
it never counts in the loss.
"""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import load_label_png
from .transforms import (
    AugParams,
    color_jitter,
    normalize,
    random_crop_box,
    resize_image,
)
from .voc import DatasetError, VOCLayout, _key, check_inputs, mask_value_message

IGNORE = 255


class SegTrainTransform:
    """Joint random rescale, flip and crop of an image and its label map.

    Args:
        crop: output side (square), e.g. 321 (DeepLab on VOC).
        scale_range: (lo, hi): the image is scaled by a factor drawn uniformly from [lo, hi] (DeepLab: 0.5-1.5);
            (1, 1) keeps the size.
        base_long: > 0 first resizes the long side to ``base_long`` (large photos on CPUs), then the random scale
            applies; 0 = the scale applies to the original image.
        flip: horizontal flip with probability 0.5.
        jitter: (brightness, contrast, saturation, hue) of the image only, or None (DeepLab uses none).

    ``__call__(rng, image, label)`` with image RGB uint8 (H, W, 3) and label uint8 (H, W) returns ``image``
    float32 (3, crop, crop) normalised (0 on padding), ``label`` int64 (crop, crop) (255 on padding) and
    ``params`` (an :class:`~smaf.data.transforms.AugParams` dict).
    """

    def __init__(self, crop: int, scale_range=(0.5, 1.5), base_long: int = 0, flip: bool = True, jitter=None):
        self.crop = int(crop)
        lo, hi = (float(v) for v in (scale_range or (1.0, 1.0)))
        if self.crop < 1 or not 0 < lo <= hi:
            raise ValueError(f"SegTrainTransform: crop must be >= 1 and scale_range (lo, hi) with 0 < lo <= hi, "
                             f"got crop {crop}, scale_range {scale_range}")
        self.scale_range = (lo, hi)
        self.base_long = int(base_long)
        self.flip = bool(flip)
        self.jitter = tuple(jitter) if jitter and any(jitter) else None

    def __call__(self, rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> dict:
        h0, w0 = image.shape[:2]
        if label.shape != (h0, w0):
            raise ValueError(f"label {label.shape} and image {(h0, w0)} sizes differ")
        base = self.base_long / max(h0, w0) if self.base_long > 0 else 1.0
        lo, hi = self.scale_range
        scale = base * (float(rng.uniform(lo, hi)) if hi > lo else lo)
        h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
        image = resize_image(image, (h, w))
        if (h, w) != (h0, w0):
            label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        flip = bool(self.flip and rng.random() < 0.5)
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.jitter:
            image = color_jitter(image, rng, *self.jitter)
        box = random_crop_box(rng, h, w, self.crop)
        ct, cl, it, il, ch, cw = box
        c = self.crop
        out_image = np.zeros((3, c, c), np.float32)
        out_image[:, ct:ct + ch, cl:cl + cw] = normalize(np.ascontiguousarray(image[it:it + ch, il:il + cw]))
        out_label = np.full((c, c), IGNORE, np.int64)
        out_label[ct:ct + ch, cl:cl + cw] = label[it:it + ch, il:il + cw]
        return {"image": out_image, "label": out_label,
                "params": AugParams((h0, w0), (h, w), scale, flip, c, *box).to_dict()}


def label_path(layout: VOCLayout, mask_dir: Path | None, image_id: str) -> Path:
    """The label PNG of ``image_id``: ``<mask_dir>/<id>.png``, or the ground truth when ``mask_dir`` is None."""
    return layout.mask_path(image_id) if mask_dir is None else Path(mask_dir) / f"{image_id}.png"


def check_label_folder(layout: VOCLayout, ids: list, mask_dir: Path | None, key: str, producer: str,
                       workers: int | None = None) -> None:
    """Check, before a stage writes anything, that every id has a label PNG of its image's size with values
    0..C or 255 (``mask_dir`` None = the ground truth). A missing folder or label is a one-line
    :class:`~smaf.data.voc.DatasetError` naming the folder (``key``, the config key that names it), how many ids
    and the first ones, and the fix (``producer``: how to make the folder); sizes and values are checked by
    :func:`smaf.data.voc.check_inputs`, with the folder in the place of the dataset's masks."""
    where = f"the ground truth '{layout.mask_dir}'" if mask_dir is None else f"{key} '{mask_dir}'"
    if mask_dir is None and layout.mask_dir is None:
        raise DatasetError(f"dataset root '{layout.root}' has no SegmentationClass(Aug)/ masks, so train_seg.masks=gt "
                           f"cannot train on the ground truth: use train_seg.masks=pseudo with train_seg.mask_dir")
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise DatasetError(f"label folder {where} not found: run {producer} first or set {key}")
    missing = [i for i in ids if not label_path(layout, mask_dir, i).is_file()]
    if missing:
        fix = (f"run {producer} on this list or set {key}" if mask_dir is not None
               else "use a training list of annotated images or train_seg.masks=pseudo")
        raise DatasetError(f"{len(missing)} of {len(ids)} training ids have no label PNG in {where} (first: "
                           f"{', '.join(missing[:3])}): {fix}")
    labels = layout
    if mask_dir is not None:
        labels = copy.copy(layout)
        labels.mask_dir = Path(mask_dir)
    check_inputs(labels, ids, key, mask_ids=ids, mask_values=True, workers=workers)


class SegTrainDataset(Dataset):
    """(image, label PNG) pairs for stage 4, keyed by ``(index, augmentation seed)`` (the training loop's
    sampler) or a plain index.

    Args:
        layout: the dataset; ids: training ids; transform: a :class:`SegTrainTransform`.
        mask_dir: folder of ``<id>.png`` label maps, or None for the dataset's ground truth.

    Items: ``{'id': str, 'image': float32 (3, crop, crop), 'label': int64 (crop, crop) (0..C, 255 ignored),
    'params': dict}``. A label value outside 0..C and 255 is a one-line DatasetError naming the file.
    """

    def __init__(self, layout: VOCLayout, ids: list, transform: SegTrainTransform, mask_dir: Path | None = None):
        self.layout, self.ids, self.transform = layout, list(ids), transform
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None

    def __len__(self) -> int:
        return len(self.ids)

    def load_label(self, image_id: str) -> np.ndarray:
        """uint8 (H, W) label map of ``image_id``, values checked (0..C or 255)."""
        path = label_path(self.layout, self.mask_dir, image_id)
        label = load_label_png(path)
        bad = label[(label > self.layout.num_classes) & (label != IGNORE)]
        if bad.size:
            raise DatasetError(mask_value_message(self.layout, path, int(bad.max())))
        return label

    def __getitem__(self, key) -> dict:
        index, seed = _key(key)
        image_id = self.ids[index]
        rng = np.random.default_rng(seed if seed is not None else None)
        image = self.layout.load_image(image_id)
        label = self.load_label(image_id)
        if label.shape != image.shape[:2]:
            path = label_path(self.layout, self.mask_dir, image_id)
            raise DatasetError(f"label PNG '{path}' is {label.shape[0]}x{label.shape[1]} (HxW) but its image is "
                               f"{image.shape[0]}x{image.shape[1]}: labels must have their image's size")
        out = self.transform(rng, image, label)
        return {"id": image_id, "image": torch.from_numpy(out["image"]), "label": torch.from_numpy(out["label"]),
                "params": out["params"]}
