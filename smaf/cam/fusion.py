"""Multi-scale, flip-fused attention maps (SMAF stage 1 and 3, validation).

One code path serves every caller. Per image and scale, the original and its horizontal flip go through
the network as ONE batch of two; activation, upsampling to the original size, un-flipping, summing and
max-normalisation all happen on the model's device, and only the final maps of the labelled classes are
copied back.

Activation per network output (related-methods §1.4): models with a background channel (EPS layout,
C+1 outputs, background last) use softmax over the C+1 channels and keep the C foreground channels;
plain CAM models (C outputs) use ReLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..amp import autocast_context


def cam_activation(cam: torch.Tensor, has_background: bool) -> torch.Tensor:
    """(B, K, h, w) raw CAM -> (B, C, h, w) foreground attention: softmax[:C] (K = C+1) or ReLU (K = C)."""
    cam = cam.float()
    if has_background:
        return torch.softmax(cam, dim=1)[:, :-1]
    return F.relu(cam)


@dataclass
class FusedResult:
    """Fused maps of one image.

    ``classes``: labelled class indices (list of int, VOC order 0..C-1); ``maps``: float32 (len(classes), H, W)
    in [0, 1], on the model's device; ``feature``: (D, h, w) feature f of the scale-1 unflipped pass (or of
    the scale nearest to 1) when requested, else None; ``single``: float32 (len(classes), H, W), the maps of
    one scale's unflipped pass alone (``single_index``), normalised the same way, else None.
    """

    classes: list
    maps: torch.Tensor
    feature: torch.Tensor | None = None
    single: torch.Tensor | None = None


@torch.no_grad()
def fuse_image(model, scaled: list, labels: torch.Tensor, out_size: tuple, flip: bool = True, amp: str = "none",
               channels_last: bool = False, with_feature: bool = False, scales: list | None = None,
               flip_in_batch: bool | None = None, single_index: int | None = None) -> FusedResult:
    """Multi-scale (x flip) fused attention maps of one image.

    Args:
        model: a CAMNet (``forward(x) -> (logits, cam, f)``, ``has_background``) in eval mode.
        scaled: per scale, the normalised image tensor (3, h_s, w_s) (CPU or device).
        labels: float (C,) image-level labels; only labelled classes are computed.
        out_size: (H, W) of the original image.
        flip: also run the horizontally flipped image (in the same batch on a GPU, as a second pass on a CPU)
            and un-flip its maps.
        amp / channels_last: CUDA speed options.
        with_feature: also return f of the unflipped pass at the scale nearest to 1 (for prototypes).
        scales: the scale of each entry of ``scaled`` (only used to pick the feature pass).
        flip_in_batch: run the flipped copy in the original's batch (default: on a GPU, not on a CPU).
        single_index: also return, as ``single``, the unflipped pass of ``scaled[single_index]`` alone: the
            single-scale CAM (scales [1.0], no flip) that a separate run would compute, from the same forward
            pass (the runner scores both without running the network twice).

    Returns a :class:`FusedResult`: sum over scales and flips of the upsampled activations of the labelled
    classes, each class divided by its maximum + 1e-5 (``single`` likewise).
    """
    device = next(model.parameters()).device
    classes = torch.nonzero(labels > 0.5).flatten().tolist()
    height, width = out_size
    total = torch.zeros((len(classes), height, width), dtype=torch.float32, device=device)
    feature_pass = 0
    if with_feature and scales is not None:
        feature_pass = min(range(len(scales)), key=lambda i: abs(float(scales[i]) - 1.0))
    feature = single = None
    # On a GPU the flipped copy shares the original's batch (one launch sequence for both). On a CPU two
    # batch-1 passes are faster: every activation of a batch of 2 is twice as large, and those beyond glibc's
    # 32 MB mmap limit come back as fresh, page-faulting memory at every op (EfficientNet-Lite0 folded, scales
    # 0.5-2 of ~250x320 images: one thread 1.97 s vs 2.36 s per image, two threads 1.00 s vs 1.21 s).
    stack_flip = flip and (device.type != "cpu" if flip_in_batch is None else flip_in_batch)
    for i, x in enumerate(scaled):
        x = x.to(device, non_blocking=True)
        if stack_flip:
            batches = [torch.stack([x, x.flip(-1)])]
        else:
            batches = [x[None], x.flip(-1)[None]] if flip else [x[None]]
        cams = []
        for batch in batches:
            if channels_last and device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                _, cam, f = model(batch)
            if with_feature and i == feature_pass and feature is None:
                feature = f[0].float()
            cams.append(cam)
        if not classes:
            continue
        cam = cams[0] if len(cams) == 1 else torch.cat(cams)
        act = cam_activation(cam, model.has_background)[:, classes]
        up = F.interpolate(act, size=(height, width), mode="bilinear", align_corners=False)
        if i == single_index:
            single = up[0] / (up[0].flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
        total += up[0]
        if flip:
            total += up[1].flip(-1)
    if classes:
        total /= total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5
    if single_index is not None and single is None:   # no labelled class: empty maps, as for the fused ones
        single = total.clone()
    return FusedResult(classes, total, feature, single)
