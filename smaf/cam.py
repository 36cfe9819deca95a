"""CAM inference: multi-scale, flip-fused attention maps (SMAF stage 1 and 3, validation).

One code path serves every caller. Per image and scale, the original and its horizontal flip go through
the network as ONE batch of two; activation, upsampling to the original size, un-flipping, summing and
max-normalisation all happen on the model's device, and only the final maps of the labelled classes are
copied back.

Activation per network output (related-methods §1.4): models with a background channel (EPS layout,
C+1 outputs, background last) use softmax over the C+1 channels and keep the C foreground channels;
plain CAM models (C outputs) use ReLU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cam_activation(cam: torch.Tensor, has_background: bool) -> torch.Tensor:
    """(B, K, h, w) raw CAM -> (B, C, h, w) foreground attention: softmax[:C] (K = C+1) or ReLU (K = C)."""
    cam = cam.float()
    if has_background:
        return torch.softmax(cam, dim=1)[:, :-1]
    return F.relu(cam)


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in {fp16, bf16} on CUDA; a no-op context otherwise."""
    if device.type != "cuda" or amp in (None, "", "none"):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r}: expected none, fp16 or bf16")
    return torch.autocast(device_type="cuda", dtype=dtype)


@dataclass
class FusedResult:
    """Fused maps of one image.

    ``classes``: labelled class indices (list of int, VOC order 0..C-1); ``maps``: float32 (len(classes), H, W)
    in [0, 1], on the model's device; ``feature``: (D, h, w) feature f of the scale-1 unflipped pass (or of
    the scale nearest to 1) when requested, else None.
    """

    classes: list
    maps: torch.Tensor
    feature: torch.Tensor | None = None


@torch.no_grad()
def fuse_image(model, scaled: list, labels: torch.Tensor, out_size: tuple, flip: bool = True, amp: str = "none",
               channels_last: bool = False, with_feature: bool = False, scales: list | None = None) -> FusedResult:
    """Multi-scale (x flip) fused attention maps of one image.

    Args:
        model: a CAMNet (``forward(x) -> (logits, cam, f)``, ``has_background``) in eval mode.
        scaled: per scale, the normalised image tensor (3, h_s, w_s) (CPU or device).
        labels: float (C,) image-level labels; only labelled classes are computed.
        out_size: (H, W) of the original image.
        flip: also run the horizontally flipped image (same batch) and un-flip its maps.
        amp / channels_last: CUDA speed options.
        with_feature: also return f of the unflipped pass at the scale nearest to 1 (for prototypes).
        scales: the scale of each entry of ``scaled`` (only used to pick the feature pass).

    Returns a :class:`FusedResult`: sum over scales and flips of the upsampled activations of the labelled
    classes, each class divided by its maximum + 1e-5.
    """
    device = next(model.parameters()).device
    classes = torch.nonzero(labels > 0.5).flatten().tolist()
    height, width = out_size
    total = torch.zeros((len(classes), height, width), dtype=torch.float32, device=device)
    feature_pass = 0
    if with_feature and scales is not None:
        feature_pass = min(range(len(scales)), key=lambda i: abs(float(scales[i]) - 1.0))
    feature = None
    for i, x in enumerate(scaled):
        x = x.to(device, non_blocking=True)
        batch = torch.stack([x, x.flip(-1)]) if flip else x[None]
        if channels_last and device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            _, cam, f = model(batch)
        if with_feature and i == feature_pass:
            feature = f[0].float()
        if not classes:
            continue
        act = cam_activation(cam, model.has_background)[:, classes]
        up = F.interpolate(act, size=(height, width), mode="bilinear", align_corners=False)
        total += up[0]
        if flip:
            total += up[1].flip(-1)
    if classes:
        total /= total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5
    return FusedResult(classes, total, feature)


def label_from_maps(result: FusedResult, bg_threshold: float) -> torch.Tensor:
    """VOC label map (H, W) uint8 on the maps' device: argmax over [bg_threshold; fused maps]."""
    maps = result.maps
    if not result.classes:
        return torch.zeros(maps.shape[1:], dtype=torch.uint8, device=maps.device)
    bg = torch.full((1, *maps.shape[1:]), float(bg_threshold), device=maps.device)
    idx = torch.cat([bg, maps]).argmax(0)
    lut = torch.tensor([0] + [c + 1 for c in result.classes], dtype=torch.uint8, device=maps.device)
    return lut[idx]


def class_feature_means(feature: torch.Tensor, label: torch.Tensor, num_classes: int,
                        min_pixels: int = 10) -> dict:
    """Per-class mean feature of one image for prototypes.

    Args:
        feature: (D, h, w) feature f at feature resolution.
        label: (H, W) uint8 VOC label map at image resolution (nearest-downsampled to h x w here).
        num_classes: C; background (label 0) becomes prototype index C (background last, as the network).
        min_pixels: classes with fewer assigned feature pixels are skipped.

    Returns ``{prototype index: float32 (D,) CPU tensor}``.
    """
    d, h, w = feature.shape
    small = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    flat_f = feature.reshape(d, -1)
    flat_l = small.flatten()
    out = {}
    for value in torch.unique(flat_l).tolist():
        if value == 255:
            continue
        mask = flat_l == value
        if int(mask.sum()) < min_pixels:
            continue
        index = num_classes if value == 0 else value - 1
        out[index] = flat_f[:, mask].mean(1).float().cpu()
    return out
