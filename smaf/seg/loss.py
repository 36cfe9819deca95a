"""The training loss of the segmentation network: per-pixel cross-entropy, 255 ignored.

The logits (B, K, h, w) at the network's output stride are upsampled bilinearly (align_corners=False) to the
label size (B, H, W) and scored there, as the PyTorch DeepLab ports do (the Caffe original shrank the labels
to the logits instead).

* ``ce``: the mean over every labelled pixel of the batch (DeepLab).
* ``balanced``: each class present in the batch's labels weighs the same: the mean over those classes of the
  mean cross-entropy of their pixels. Pseudo masks of objects are dominated by background pixels; this keeps
  small classes from being drowned.

Pixels labelled 255 (unknown, crop padding) take no part: neither their logits nor their label change the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "balanced")
IGNORE = 255


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, mode: str = "ce",
                      ignore_index: int = IGNORE) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of ``logits`` (B, K, h, w) against ``label`` (B, H, W) integer classes 0..K-1 (and
    ``ignore_index``). Returns (scalar loss, {'pixel_acc': percent of labelled pixels whose argmax is right}).
    A batch without labelled pixels has loss 0 (with a gradient of zeros). A label value in K..254 is a
    ValueError (a class-count mismatch)."""
    if mode not in LOSSES:
        raise ValueError(f"segmentation loss {mode!r}: expected one of {', '.join(LOSSES)}")
    label = label.to(logits.device).long()
    k = logits.shape[1]
    if tuple(logits.shape[-2:]) != tuple(label.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
    logits = logits.float()
    valid = label != ignore_index
    if bool(((label >= k) & valid).any()) or bool((label < 0).any()):
        bad = int(label[valid & ((label >= k) | (label < 0))].max())
        raise ValueError(f"label value {bad} does not fit a network with {k} outputs (0..{k - 1} and "
                         f"{ignore_index} allowed)")
    per_pixel = F.cross_entropy(logits, torch.where(valid, label, torch.zeros_like(label)), reduction="none")
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
    count = valid.sum()
    if int(count) == 0:
        return logits.sum() * 0.0, {"pixel_acc": 0.0}
    if mode == "ce":
        loss = per_pixel.sum() / count
    else:
        target = torch.where(valid, label, torch.full_like(label, k))   # class k = ignored
        sums = torch.zeros(k + 1, device=logits.device).index_add_(0, target.flatten(), per_pixel.flatten())
        counts = torch.bincount(target.flatten(), minlength=k + 1)[:k].float()
        present = counts > 0
        loss = (sums[:k][present] / counts[present]).mean()
    with torch.no_grad():
        correct = ((logits.argmax(1) == label) & valid).sum()
    return loss, {"pixel_acc": float(100.0 * correct / count)}
