"""Validation of a segmentation network during training: single-scale, unflipped mIoU on a list with masks.

:class:`SegValidator` is :class:`smaf.cam.validate.CAMValidator` (the same list, mask checks and confusion
matrix) with the network's own prediction in the place of the CAM rule: the argmax of its upsampled logits."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..cam.validate import CAMValidator
from ..metrics import confusion_matrix, scores
from .inference import SegImageDataset, collate_list, segment_batch


class SegValidator(CAMValidator):
    """``validator(model) -> {'val_miou': percent}``: the argmax of the network's upsampled logits at scale 1
    (long side ``base_long`` when > 0), no flip, against the masks of ``list_path``; ``{}`` when the list is
    empty, unreadable or has no masks (noted once in the log).

    Args:
        layout: the dataset; list_path: '' disables validation; max_images: 0 = the whole list, else its first N.
        base_long, resize: the network input size rule (:class:`~smaf.seg.inference.SegImageDataset`).
        amp, num_workers: the config's values (at most 2 loader workers).

    Its inputs are checked before a stage writes anything by :meth:`CAMValidator.check_config_inputs`.
    """

    def __init__(self, layout, list_path: str, max_images: int, base_long: int, resize: str, amp: str,
                 num_workers: int, logger):
        super().__init__(layout, list_path, max_images, None, base_long, amp, num_workers, logger, resize)
        self.description = f"single-scale mIoU, {len(self.ids)} images"

    @classmethod
    def from_config(cls, cfg, layout, max_images: int, logger) -> SegValidator:
        """The validator of stage 4: ``data.val_list`` at the ``infer_seg`` section's input size."""
        return cls(layout, cfg.data.val_list, max_images, cfg.infer_seg.base_long, cfg.infer_seg.resize, cfg.amp,
                   cfg.num_workers, logger)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        if not self.ids:
            return {}
        was_training = model.training
        model.eval()
        conf = 0
        items = [(i, self.layout.image_path(i)) for i in self.ids]
        dataset = SegImageDataset(items, scales=(1.0,), base_long=self.base_long, resize=self.resize)
        loader = DataLoader(dataset, batch_size=1, num_workers=self.workers, collate_fn=collate_list,
                            generator=torch.Generator())   # never consume the global RNG (exact resume)
        for batch in loader:
            sample = batch[0]
            probs = segment_batch(model, [sample["scaled"]], [sample["image"].shape[:2]], flip=False,
                                  amp=self.amp)[0]
            pred = probs.argmax(0).to(torch.uint8).cpu().numpy()
            conf = conf + confusion_matrix(pred, self._mask(sample["id"], pred.shape), self.layout.num_classes)
        model.train(was_training)
        return {"val_miou": scores(conf, ["background"] + self.layout.class_names)["miou"]}
