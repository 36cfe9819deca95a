"""Losses of stage 0 (classification, EPS saliency) and stage 2 (self-training target and loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multilabel_soft_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over classes and batch. logits, labels: (B, C)."""
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def eps_saliency_loss(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4,
                      lam: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """EPS saliency loss (related-methods §5).

    Args:
        cam: (B, C+1, h, w) raw CAM, background last.
        saliency: (B, 1, H, W) saliency in [0, 1]; resized to (h, w) with nearest interpolation.
        labels: (B, C) image-level labels.
        tau: overlap threshold deciding whether a labelled class counts as foreground.
        lam: weight of the foreground term in the predicted saliency.

    Per image: p = softmax(cam); O_c = sum(round(p_c) round(S)) / (sum(round(p_c)) + 1e-4); the foreground
    set is {labelled c with O_c > tau}, the background set {bg} + {labelled c with O_c <= tau};
    S_hat = lam * sum_fg p + (1 - lam) * (1 - sum_bg p); loss = mean((S_hat - S)^2).

    Returns (loss scalar, S_hat (B, 1, h, w)).
    """
    b, k, h, w = cam.shape
    c = k - 1
    p = torch.softmax(cam.float(), dim=1)
    sal = F.interpolate(saliency.float(), size=(h, w), mode="nearest")
    with torch.no_grad():
        p_round = torch.round(p[:, :c])
        s_round = torch.round(sal)
        overlap = (p_round * s_round).sum((2, 3)) / (p_round.sum((2, 3)) + 1e-4)       # (B, C)
        present = labels > 0.5
        fg_sel = (present & (overlap > tau)).float()                                   # (B, C)
        bg_sel = (present & (overlap <= tau)).float()
    m_fg = (p[:, :c] * fg_sel[:, :, None, None]).sum(1, keepdim=True)
    m_bg = (p[:, :c] * bg_sel[:, :, None, None]).sum(1, keepdim=True) + p[:, c:]
    s_hat = lam * m_fg + (1 - lam) * (1 - m_bg)
    return F.mse_loss(s_hat, sal), s_hat


def self_training_target(fused: torch.Tensor, labels: torch.Tensor, bg_score=0.2,
                         weights: torch.Tensor | None = None, bg_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SMAF stage-2 target (denoising + reactivation).

    Args:
        fused: (B, C, h, w) fused maps M at target resolution.
        labels: (B, C) image-level labels.
        bg_score: the background score: a constant, or a (B,) tensor (one per image, e.g. each image's Otsu
            threshold of its whole fused map, so that the target's partition is the mask rule's).
        weights: optional (B, C, h, w) denoising weights of the foreground channels.
        bg_weight: optional (B, 1, h, w) denoising weight of the background channel.

    Returns T (B, C+1, h, w): [M * y (* w); bg (* w_bg)] divided per pixel by its channel maximum, so the winning
    class becomes 1 and the others keep their relative strength (the maximum is never 0: bg > 0).
    """
    fg = fused * labels[:, :, None, None]
    if weights is not None:
        fg = fg * weights
    bg_value = torch.as_tensor(bg_score, dtype=fg.dtype, device=fg.device).reshape(-1, 1, 1, 1)
    bg = bg_value.expand(fg.shape[0], 1, *fg.shape[2:])
    if bg_weight is not None:
        bg = bg * bg_weight
    target = torch.cat([fg, bg], 1)
    return target / target.amax(1, keepdim=True).clamp(min=1e-12)


def self_training_loss(student_cam: torch.Tensor, target: torch.Tensor, weight: float = 100.0,
                       align_corners: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """weight x MSE(softmax(student cam bilinearly resized to the target size), target).

    student_cam: (B, C+1, h, w); target: (B, C+1, H, W); ``align_corners`` of the resize (the reference: True);
    ``valid``: optional (B, H, W) pixel weights in [0, 1] (the fraction of image, not crop padding, under each
    target pixel): the squared error is then averaged over the weighted pixels only, so padding teaches nothing.
    With ``valid`` all ones this equals the plain mean over every pixel."""
    cam = F.interpolate(student_cam.float(), size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    if valid is None:
        return weight * F.mse_loss(torch.softmax(cam, 1), target)
    err = (torch.softmax(cam, 1) - target).pow(2).mean(1)
    return weight * (err * valid).sum() / valid.sum().clamp(min=1e-6)


def prototype_similarity(feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel feature to every prototype.
    feature: (B, D, h, w); prototypes: (K, D). Returns (B, K, h, w) in [-1, 1]."""
    f = F.normalize(feature.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=1)
    return torch.einsum("bdhw,kd->bkhw", f, p)


def prototype_weights(feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The reference's denoising weights ReLU(cosine(f, prototype_k)) per pixel (``denoise_rule: reference``).
    feature: (B, D, h, w); prototypes: (K, D). Returns (B, K, h, w)."""
    return F.relu(prototype_similarity(feature, prototypes))


def softmax_prototype_weights(similarity: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProDA-style denoising weights over the image's labelled classes and the background together.

    Args:
        similarity: (B, C+1, h, w) cosine similarities to the C class prototypes and the background one (last).
        labels: (B, C) image-level labels (unlabelled classes get weight 0).
        temperature: softmax temperature (> 0).

    Returns (B, C+1, h, w): per pixel, softmax over {labelled classes, background} of similarity / temperature
    (0 elsewhere), rescaled so that their mean is 1. A uniform shift of the similarities cancels, and equal
    prototypes give weight 1 everywhere, i.e. no change to the target.
    """
    keep = torch.cat([labels > 0.5, torch.ones_like(labels[:, :1], dtype=torch.bool)], 1)[:, :, None, None]
    logits = (similarity / float(temperature)).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return weights * keep.sum(1, keepdim=True).to(weights.dtype)


def scale_matched_temperature(similarity: torch.Tensor, labels: torch.Tensor) -> float:
    """A temperature on the scale of the similarities themselves: the mean over pixels of the spread
    (max - min) of the cosine similarities among each image's labelled classes and the background, so that
    the softmax of :func:`softmax_prototype_weights` is neither uniform nor one-hot. ``similarity``:
    (B, C+1, h, w); ``labels``: (B, C). No ground truth involved."""
    keep = torch.cat([labels > 0.5, torch.ones_like(labels[:, :1], dtype=torch.bool)], 1)[:, :, None, None]
    big = torch.finfo(similarity.dtype).max
    hi = similarity.masked_fill(~keep, -big).amax(1)
    lo = similarity.masked_fill(~keep, big).amin(1)
    return max(float((hi - lo).mean()), 1e-3)
