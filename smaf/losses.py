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


def self_training_target(fused: torch.Tensor, labels: torch.Tensor, bg_score: float = 0.2,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """SMAF stage-2 target (denoising + reactivation).

    Args:
        fused: (B, C, h, w) fused maps M at target resolution.
        labels: (B, C) image-level labels.
        bg_score: constant background score.
        weights: optional (B, C, h, w) denoising weights ReLU(cos(f, prototype_k)).

    Returns T (B, C+1, h, w): [M * y (* w); bg] divided per pixel by its channel maximum, so the winning
    class becomes 1 and the others keep their relative strength (bg > 0, so the maximum is never 0).
    """
    fg = fused * labels[:, :, None, None]
    if weights is not None:
        fg = fg * weights
    bg = torch.full_like(fg[:, :1], float(bg_score))
    target = torch.cat([fg, bg], 1)
    return target / target.amax(1, keepdim=True)


def self_training_loss(student_cam: torch.Tensor, target: torch.Tensor, weight: float = 100.0) -> torch.Tensor:
    """weight x MSE(softmax(student cam bilinearly resized to the target size), target).
    student_cam: (B, C+1, h, w); target: (B, C+1, H, W)."""
    cam = F.interpolate(student_cam.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return weight * F.mse_loss(torch.softmax(cam, 1), target)


def prototype_weights(feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Denoising weights ReLU(cosine(f, prototype_k)) per pixel.
    feature: (B, D, h, w); prototypes: (K, D). Returns (B, K, h, w)."""
    f = F.normalize(feature.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=1)
    return F.relu(torch.einsum("bdhw,kd->bkhw", f, p))
