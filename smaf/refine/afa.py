"""AFA's training labels (related-methods.md §7, steps 1-3, 5, 6): the multi-scale CAM of the batch, the
two-background label rule, PAR-refined pseudo labels, affinity labels on the last stage's grid, and the
one-step propagation of the CAM by the predicted affinity.

Everything runs on the device, batched, without gradients (labels are targets). Label maps use VOC numbering:
0 background, c + 1 class c, ``IGNORE`` (255) unknown. Grids are row-major: position i = y * w + x.

* :func:`multi_scale_cam`: per scale s in (1, 0.5, 1.5), the crop resized by s and its mirror image go through
  encoder + classifier; ReLU, bilinear to the crop size, the two fused by max; summed over scales; per image and
  class min-max normalised to [0, 1] and zeroed for absent classes. The largest scale's affinity (1.5: a 48 x 48
  grid for a 512 crop at stride 16) is kept for the propagation.
* :func:`threshold_cam_labels` (step 2): argmax over the classes; max <= 0.55 -> 255, max <= 0.35 -> 0; outside the
  crop box -> 255.
* PAR labels (step 3): :func:`smaf.refine.par.refine_cams_with_background` (softmax over [0.55; CAMs] and over
  [0.35; CAMs], PAR at half resolution, argmax; the high one's foreground, background where both agree, 255
  between).
* :func:`affinity_labels` (step 5): the label map nearest-resized to the affinity grid; a pair is 1 when both
  positions have the same label, 0 when different, 255 when either is 255 or the pair lies outside the
  radius-8 square window (|dy| <= 8 and |dx| <= 8).
* :func:`propagate_cams` (step 6): the affinity masked to that window, squared, each column divided by its sum
  + 0.1, then one product: scores_j = sum_i softmax([b; CAMs])_i a_ij; done for b = 0.55 and 0.35 and the two
  results PAR-refined and combined like the PAR labels (:func:`smaf.refine.par.refine_scores_with_background`).

The window mask is built with broadcasting (the reference builds a dense hw x hw mask in a Python loop, §10).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .par import AFA_BG_HIGH, AFA_BG_LOW

IGNORE = 255
CAM_SCALES = (1.0, 0.5, 1.5)          # §7 step 1
AFFINITY_RADIUS = 8                   # §7 steps 5-6
PROPAGATION_POWER = 2                 # the affinity is squared before the propagation
PROPAGATION_COLUMN_EPS = 0.1          # added to each column sum


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def multi_scale_cam(model, images: torch.Tensor, labels: torch.Tensor, scales=CAM_SCALES,
                    with_affinity: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None]:
    """The batch's normalised CAMs and the largest scale's affinity.

    Args:
        model: an :class:`~smaf.models.afa.AFANet` (not the DDP wrapper: no gradients flow here).
        images: (B, 3, H, W) normalised crops; labels: (B, C) image-level labels.
        scales: input scales; with_affinity: also return the affinity of the largest scale's unflipped pass.

    Returns (CAMs (B, C, H, W) in [0, 1], 0 for absent classes; affinity (B, N, N) of that pass or None; its
    grid (h, w), N = h w, or None).
    """
    b = images.shape[0]
    size = images.shape[-2:]
    largest = max(range(len(scales)), key=lambda k: scales[k])
    total, affinity, grid = None, None, None
    for k, s in enumerate(scales):
        x = images if s == 1 else F.interpolate(images, scale_factor=float(s), mode="bilinear",
                                                align_corners=False, recompute_scale_factor=False)
        cam, aff = model.cam_and_affinity(torch.cat([x, x.flip(-1)]), with_affinity and k == largest)
        if aff is not None:
            affinity, grid = aff[:b].float(), tuple(cam.shape[-2:])
        cam = _resize(F.relu(cam.float()), size)
        cam = torch.maximum(cam[:b], cam[b:].flip(-1))
        total = cam if total is None else total + cam
    lo = total.amin(dim=(2, 3), keepdim=True)
    hi = total.amax(dim=(2, 3), keepdim=True)
    cams = (total - lo) / (hi - lo + 1e-5)
    return cams * (labels > 0.5).to(cams.dtype)[:, :, None, None], affinity, grid


@torch.no_grad()
def threshold_cam_labels(cams: torch.Tensor, bg_high: float = AFA_BG_HIGH, bg_low: float = AFA_BG_LOW,
                         valid: torch.Tensor | None = None, ignore_index: int = IGNORE) -> torch.Tensor:
    """AFA's initial label (step 2): cams (B, C, H, W) in [0, 1] (absent classes 0) -> (B, H, W) long: argmax + 1;
    255 where the max is <= ``bg_high``; 0 where it is <= ``bg_low``; 255 where ``valid`` (B, H, W) is False."""
    value, index = cams.max(dim=1)
    label = index + 1
    label[value <= bg_high] = ignore_index
    label[value <= bg_low] = 0
    if valid is not None:
        label[~valid.bool()] = ignore_index
    return label


def window_mask(h: int, w: int, radius: int = AFFINITY_RADIUS, device=None) -> torch.Tensor:
    """(N, N) bool, N = h w: True for the pairs (i, j) with |y_i - y_j| <= radius and |x_i - x_j| <= radius."""
    y = torch.arange(h, device=device).repeat_interleave(w)
    x = torch.arange(w, device=device).repeat(h)
    return ((y[:, None] - y[None, :]).abs() <= radius) & ((x[:, None] - x[None, :]).abs() <= radius)


@torch.no_grad()
def affinity_labels(label: torch.Tensor, grid: tuple, radius: int = AFFINITY_RADIUS,
                    ignore_index: int = IGNORE) -> torch.Tensor:
    """Pair labels (step 5): label (B, H, W) long -> (B, N, N) long on the (h, w) ``grid`` (N = h w; the label
    nearest-resized to it): 1 same label, 0 different, ``ignore_index`` when either is ``ignore_index`` or the
    pair is outside the radius window."""
    h, w = grid
    small = F.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)   # (B, N)
    pairs = (small[:, :, None] == small[:, None, :]).long()
    unknown = (small == ignore_index)
    pairs[unknown[:, :, None] | unknown[:, None, :]] = ignore_index
    pairs[:, ~window_mask(h, w, radius, label.device)] = ignore_index
    return pairs


@torch.no_grad()
def propagate_cams(cams: torch.Tensor, affinity: torch.Tensor, grid: tuple, labels: torch.Tensor, bg_score: float,
                   radius: int = AFFINITY_RADIUS, power: float = PROPAGATION_POWER,
                   column_eps: float = PROPAGATION_COLUMN_EPS) -> torch.Tensor:
    """One propagation step of the CAM by the affinity (step 6).

    Args:
        cams: (B, C, H, W) normalised CAMs (any size: resized bilinearly to the affinity's grid).
        affinity: (B, N, N) predicted affinity; grid: its (h, w), N = h w.
        labels: (B, C) image-level labels: the softmax runs over the background and the labelled classes.
        bg_score: the constant background score b.
        radius, power, column_eps: window, exponent and column-sum offset (AFA: 8, 2, 0.1).

    Returns (B, 1 + C, h, w) scores: scores_j = sum_i p_i a'_ij with p = softmax([b; labelled CAMs]) (0 for absent
    classes) and a' = (window * a)^power / (column sum + column_eps). With the identity affinity and
    column_eps 0 the scores are p itself.
    """
    b = affinity.shape[0]
    h, w = grid
    if affinity.shape[-1] != h * w:
        raise ValueError(f"propagate_cams: affinity over {affinity.shape[-1]} positions, grid {h} x {w}")
    small = _resize(cams.float(), (h, w))
    keep = torch.cat([labels.new_ones(b, 1), labels], dim=1) > 0.5
    scores = torch.cat([torch.full_like(small[:, :1], float(bg_score)), small], dim=1)
    probs = scores.masked_fill(~keep[:, :, None, None], float("-inf")).softmax(1).flatten(2)   # (B, K, N)
    a = affinity.float() * window_mask(h, w, radius, affinity.device)
    a = a.pow(power)
    a = a / (a.sum(dim=1, keepdim=True) + column_eps)
    return torch.bmm(probs, a).reshape(b, -1, h, w)

