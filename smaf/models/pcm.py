"""SEAM's pixel correlation module (PCM, related-methods.md §3) and the CAM normalisations around it.

The PCM refines a CAM by an affinity between the pixels of the same image, computed from low-level features
that carry no gradient back into the backbone::

    level 1 (detached) -> 1x1 conv -> 64  + ReLU  \\
    level 2 (detached) -> 1x1 conv -> 128 + ReLU   } concat with the image resized to (h, w): 3 + 64 + 128 = 195
                                                    -> 1x1 conv 195 -> 192 (xavier, gain 4) = g (B, 192, h, w)
    A = ReLU(gn^T gn), gn = g / ||g|| per pixel; A normalised to sum 1 over its first index (the source pixel)
    cam_rv = cam_in . A    (B, K, h, w)

with ``cam_in`` = :func:`pcm_input` of the raw CAM (no gradient): the PCM learns only through A. The two levels
are the intermediate levels AffinityNet uses (:data:`smaf.models.affinity.BACKBONE_LEVELS`, the first two):
``conv4`` (512) and ``conv5`` (1024) on ResNet-38 as in SEAM, ``conv3`` (40) and ``conv4`` (112) on
EfficientNet-Lite0, stages 2 and 3 on MiT; a level at another resolution than the CAM is resized bilinearly
to (h, w). The level convs have no bias and are kaiming-normal initialised (as SEAM's f8_3 / f8_4).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: widths of the two level convs and of the combining conv (SEAM's f8_3, f8_4, f9)
LEVEL_WIDTHS = (64, 128)
PCM_DIM = 192
NORM_EPS = 1e-5


def keep_max_foreground(cam: torch.Tensor, bg_index: int) -> torch.Tensor:
    """Per pixel, zero every foreground channel except the largest one (ties all kept); the background channel
    ``bg_index`` is left as it is. cam: (B, K, h, w) -> (B, K, h, w) (a new tensor). This is SEAM's "max one-hot"
    used for the PCM input and for the ECR target (the winning class keeps its value, it is not set to 1)."""
    k = cam.shape[1]
    bg_index = bg_index % k
    fg = torch.cat([cam[:, :bg_index], cam[:, bg_index + 1:]], 1)
    fg = fg * (fg >= fg.amax(1, keepdim=True)).to(fg.dtype)
    return torch.cat([fg[:, :bg_index], cam[:, bg_index:bg_index + 1], fg[:, bg_index:]], 1)


def pcm_input(cam: torch.Tensor, has_background: bool) -> torch.Tensor:
    """The PCM's input from the raw CAM (no gradient): ReLU, each channel divided by its maximum over the image
    (+1e-5), background = 1 - the foreground maximum, foreground channels other than the per-pixel maximum
    zeroed. cam: (B, C+1, h, w) with the background last (``has_background``, its values are replaced) or
    (B, C, h, w) -> (B, C+1, h, w), background last."""
    with torch.no_grad():
        fg = cam[:, :-1] if has_background else cam
        fg = F.relu(fg.float() - NORM_EPS) / (F.relu(fg.float()).amax((2, 3), keepdim=True) + NORM_EPS)
        bg = 1.0 - fg.amax(1, keepdim=True)
        return keep_max_foreground(torch.cat([fg, bg], 1), bg_index=-1)


class PixelCorrelationModule(nn.Module):
    """SEAM's PCM (module docstring).

    Args:
        level_channels: channels of the two backbone levels it reads (e.g. (512, 1024) for ResNet-38).
    """

    def __init__(self, level_channels: tuple[int, int]):
        super().__init__()
        self.level_convs = nn.ModuleList(nn.Conv2d(int(c), w, 1, bias=False)
                                         for c, w in zip(level_channels, LEVEL_WIDTHS))
        self.combine = nn.Conv2d(3 + sum(LEVEL_WIDTHS), PCM_DIM, 1, bias=False)
        for conv in self.level_convs:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.combine.weight, gain=4)

    def affinity(self, image: torch.Tensor, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """image (B, 3, H, W), levels [(B, c_i, h_i, w_i)] -> A (B, hw, hw), A[b, i, j] >= 0 with
        sum_i A[b, i, j] = 1 (up to the 1e-5 of the normaliser): how much pixel i contributes to pixel j."""
        parts = [F.interpolate(image.float(), size=size, mode="bilinear", align_corners=True)]
        for conv, level in zip(self.level_convs, levels):
            level = level.detach()
            if tuple(level.shape[-2:]) != tuple(size):
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=True)
            parts.append(F.relu(conv(level)))
        g = self.combine(torch.cat([p.to(parts[-1].dtype) for p in parts], 1)).float().flatten(2)   # (B, 192, hw)
        g = g / (g.norm(dim=1, keepdim=True) + NORM_EPS)
        aff = F.relu(torch.bmm(g.transpose(1, 2), g))
        return aff / (aff.sum(1, keepdim=True) + NORM_EPS)

    def forward(self, cam_in: torch.Tensor, image: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """cam_in (B, K, h, w) (:func:`pcm_input`), image (B, 3, H, W), levels: the two backbone levels ->
        cam_rv (B, K, h, w) = cam_in . A."""
        b, k, h, w = cam_in.shape
        aff = self.affinity(image, levels, (h, w))
        return torch.bmm(cam_in.float().flatten(2), aff).view(b, k, h, w)
