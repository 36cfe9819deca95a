"""Validation of a CAM network during training: single-scale CAM mIoU on a list with masks."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..data.voc import DatasetError, InferenceDataset, check_inputs, collate_single, mask_value_message
from ..metrics import confusion_matrix, scores
from ..runtime import default_workers
from .background import BackgroundRule, label_from_maps
from .fusion import fuse_image


class CAMValidator:
    """``validator(model) -> {'val_miou': percent}``: single-scale (no flip) CAM mIoU on ``list_path`` with the
    background score of ``bg_rule`` per image; ``{}`` when the list has no masks (noted once in the log).

    Args:
        layout: the dataset (:class:`~smaf.data.voc.VOCLayout`); list_path: '' disables validation.
        max_images: 0 = the whole list, else its first N ids.
        bg_rule: a :class:`~smaf.cam.background.BackgroundRule` (the ``inference`` section's rule).
        base_long, resize: the ``inference`` settings of the run (images resized as for stages 1 and 3).
        amp, num_workers: the config's values (at most 2 loader workers).
    """

    def __init__(self, layout, list_path: str, max_images: int, bg_rule: BackgroundRule, base_long: int,
                 amp: str, num_workers: int, logger, resize: str = "cv2"):
        self.layout, self.logger, self.bg_rule = layout, logger, bg_rule
        self.workers = min(2, default_workers(num_workers))
        self.amp, self.base_long, self.resize = amp, base_long, resize
        try:
            ids = layout.read_list(list_path) if list_path else []
        except DatasetError as err:
            logger.info("validation disabled: %s", err)
            ids = []
        if max_images and len(ids) > max_images:
            ids = ids[:max_images]
        self.ids = ids if ids and layout.has_masks(ids) else []
        if ids and not self.ids:
            logger.info("validation skipped: the validation list '%s' has no ground-truth masks", list_path)
        self.description = f"single-scale CAM mIoU, {len(self.ids)} images"

    @staticmethod
    def check_config_inputs(cfg, layout, max_images: int) -> None:
        """Check, before a stage writes anything, the images and masks its validation will read (the first
        ``max_images`` ids of ``data.val_list`` when they all have masks): readable images, masks of their
        image's size with values 0..C or 255. A list that cannot be read is left to the validator (it only
        disables validation)."""
        list_path = cfg.data.val_list
        try:
            ids = layout.read_list(list_path) if list_path else []
        except DatasetError:
            return
        ids = ids[:max_images] if max_images else ids
        if ids and layout.has_masks(ids):
            check_inputs(layout, ids, "data.val_list", mask_ids=ids, mask_values=True)

    @classmethod
    def from_config(cls, cfg, layout, max_images: int, logger) -> "CAMValidator":
        """The validator of a training stage: ``data.val_list`` under the ``inference`` section's settings."""
        rule = BackgroundRule.from_section(cfg.inference, "inference")
        return cls(layout, cfg.data.val_list, max_images, rule, cfg.inference.base_long, cfg.amp, cfg.num_workers,
                   logger, cfg.inference.resize)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        if not self.ids:
            return {}
        was_training = model.training
        model.eval()
        conf = 0
        dataset = InferenceDataset(self.layout, self.ids, scales=(1.0,), base_long=self.base_long, resize=self.resize)
        loader = DataLoader(dataset, batch_size=1, num_workers=self.workers, collate_fn=collate_single,
                            generator=torch.Generator())  # never consume the global RNG (exact resume)
        for sample in loader:
            result = fuse_image(model, sample["scaled"], sample["labels"], sample["image"].shape[:2], flip=False,
                                amp=self.amp)
            pred = label_from_maps(result, self.bg_rule(result.maps)).cpu().numpy()
            conf = conf + confusion_matrix(pred, self._mask(sample["id"], pred.shape), self.layout.num_classes)
        model.train(was_training)
        return {"val_miou": scores(conf, ["background"] + self.layout.class_names)["miou"]}

    def _mask(self, image_id: str, image_size: tuple):
        """The ground truth of ``image_id``, checked: its image's size, values 0..C or 255 (a wrong class count
        would otherwise be ignored silently by the confusion matrix)."""
        mask = self.layout.load_mask(image_id)
        path = self.layout.mask_path(image_id)
        if tuple(mask.shape) != tuple(image_size):
            raise DatasetError(f"mask '{path}' is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
                               f"'{self.layout.image_path(image_id)}' is {image_size[0]}x{image_size[1]}: a mask "
                               f"must have its image's size; fix the mask or the image")
        bad = mask[(mask > self.layout.num_classes) & (mask != 255)]
        if bad.size:
            raise DatasetError(mask_value_message(self.layout, path, int(bad.max())))
        return mask
