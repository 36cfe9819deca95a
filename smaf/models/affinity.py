"""AffinityNet (PSA, related-methods.md §1.7 and §2): a backbone + a feature head whose L1 feature distances give
pixel affinities on the stride-8 grid, the PSA pair sets and the PSA affinity loss.

Head on ``resnet38d`` (PSA)::

    conv4 (512)  -> 1x1 conv -> 64  + ELU  \\
    conv5 (1024) -> 1x1 conv -> 128 + ELU   } concat 448 -> 1x1 conv 448 -> 448 + ELU = f (B, 448, h, w)
    conv6 (4096) -> 1x1 conv -> 256 + ELU  /

the same head on ``efficientnet_lite0`` takes three levels of the backbone: ``conv3`` (40 ch, stride 8),
``conv4`` (112 ch, stride 8 or 16) and ``conv6`` (1280 ch, the output stride); coarser levels are upsampled
bilinearly to the stride-8 grid of ``conv3``, so f is always at stride 8: h = ceil(H / 8), w = ceil(W / 8). On
the MiT backbones (``mit_b0`` ... ``mit_b5``) the levels are ``stage2`` (stride 8), ``stage3`` and ``conv6``
(stage 4), the same way.
All head convs have no bias; the three level convs are kaiming-normal initialised, the last one xavier-uniform
with gain 4 (PSA).

Affinity of two grid pixels: ``a_ij = exp(-mean_c |f_i - f_j|)`` in (0, 1].

Pairs (PSA, radius 5): the 34 "half" offsets (0, 1..4) and (dy = 1..4, dx = -4..4) with dx^2 + dy^2 < 25
(:func:`psa_offsets`); sources are the grid pixels in rows [0 : h-4] and columns [4 : w-4]
(:func:`source_crop`), so every target lies inside the grid.

Loss (PSA): L = 1/4 L_bg+ + 1/4 L_fg+ + 1/2 L-, with L_bg+ = -mean log(a + 1e-5) over pairs of two background
pixels, L_fg+ the same over pairs of two pixels of the same foreground class, L- = -mean log(1 + 1e-5 - a)
over pairs of different labels; pairs touching 255 are left out (:func:`affinity_loss`). Each mean is a sum
over the whole batch divided by (count + 1e-5).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .a2gnn import gated_crf_kernel, neighbour_stack, window_distances, window_mask, window_offsets
from .registry import register_architecture

FEATURE_DIM = 448
LEVEL_WIDTHS = (64, 128, 256)
#: Feature levels of each backbone (keys of its forward dict) and their channels.
BACKBONE_LEVELS = {
    "resnet38d": (("conv4", 512), ("conv5", 1024), ("conv6", 4096)),
    "efficientnet_lite0": (("conv3", 40), ("conv4", 112), ("conv6", 1280)),
    # MiT: stage 2 (stride 8), stage 3 (8 or 16), stage 4 (the output stride); widths of smaf.models.mit
    "mit_b0": (("stage2", 64), ("stage3", 160), ("conv6", 256)),
    **{f"mit_b{i}": (("stage2", 128), ("stage3", 320), ("conv6", 512)) for i in range(1, 6)},
}
# vit_s14_focus has no entry: its single token grid is at stride 14, and the PSA pairs live on the stride-8 grid.
PSA_RADIUS = 5
IGNORE = 255
EPS = 1e-5


def psa_offsets(radius: int = PSA_RADIUS) -> list[tuple[int, int]]:
    """The PSA half neighbourhood: ``(dy, dx)`` for (0, 1..r-1), then dy = 1..r-1 with dx = -(r-1)..r-1 and
    dx^2 + dy^2 < r^2 (row-major). 34 offsets for r = 5."""
    if int(radius) < 2:
        raise ValueError(f"affinity radius must be >= 2, got {radius}")
    r = int(radius)
    offsets = [(0, dx) for dx in range(1, r)]
    for dy in range(1, r):
        for dx in range(-r + 1, r):
            if dx * dx + dy * dy < r * r:
                offsets.append((dy, dx))
    return offsets


def source_crop(h: int, w: int, radius: int = PSA_RADIUS) -> tuple[slice, slice]:
    """Rows and columns of the pair sources on an h x w grid: [0 : h-(r-1)] and [r-1 : w-(r-1)]. A grid
    smaller than (r, 2r-1) has no sources: ValueError."""
    m = int(radius) - 1
    if h - m < 1 or w - 2 * m < 1:
        raise ValueError(f"a {h}x{w} feature grid is too small for affinity radius {radius} (needs at least "
                         f"{m + 1}x{2 * m + 1}: use larger crops, e.g. train_aff.crop >= {8 * (2 * m + 1)})")
    return slice(0, h - m), slice(m, w - m)


def _targets(x: torch.Tensor, radius: int):
    """(sources, [targets per offset]) of a (..., h, w) tensor: views of shape (..., hs, ws)."""
    h, w = x.shape[-2:]
    rows, cols = source_crop(h, w, radius)
    hs, ws = rows.stop - rows.start, cols.stop - cols.start
    m = int(radius) - 1
    src = x[..., rows, cols]
    dst = [x[..., dy:dy + hs, m + dx:m + dx + ws] for dy, dx in psa_offsets(radius)]
    return src, dst


def pair_affinities(f: torch.Tensor, radius: int = PSA_RADIUS) -> torch.Tensor:
    """Affinities of the PSA pairs: f (B, D, h, w) -> (B, P, hs, ws), P = 34 for r = 5, a = exp(-mean_c |f_i -
    f_j|) for source i in :func:`source_crop` and target j = i + offset p."""
    src, dst = _targets(f, radius)
    return torch.stack([torch.exp(-(src - d).abs().mean(1)) for d in dst], 1)


def pair_labels(label: torch.Tensor, radius: int = PSA_RADIUS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PSA pair sets of a grid label (B, h, w) (0 background, c+1 class c, 255 unknown): float masks
    ``(bg_pos, fg_pos, neg)`` of shape (B, P, hs, ws): both background; both the same foreground class; two
    different known labels."""
    src, dst = _targets(label, radius)
    return _pair_sets(src.unsqueeze(1), torch.stack(dst, 1))


def _pair_sets(src: torch.Tensor, dst: torch.Tensor, allowed: torch.Tensor | None = None):
    """(bg_pos, fg_pos, neg) float masks of pairs with source labels ``src`` (B, 1, ...) and target labels ``dst``
    (B, P, ...), pairs touching 255 (or outside ``allowed``, a bool mask of dst's shape) left out."""
    known = (src != IGNORE) & (dst != IGNORE)
    if allowed is not None:
        known = known & allowed
    same = (src == dst) & known
    return (same & (src == 0)).float(), (same & (src != 0)).float(), (known & (src != dst)).float()


def _psa_terms(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor):
    """PSA's loss 1/4 L_bg+ + 1/4 L_fg+ + 1/2 L- of pair affinities under the three pair masks (module
    docstring). Returns (loss, {'bg_pos', 'fg_pos', 'neg', 'pairs_bg', 'pairs_fg', 'pairs_neg'})."""
    log_pos = torch.log(aff + EPS)
    log_neg = torch.log(1.0 + EPS - aff)
    bg_loss = -(bg_pos * log_pos).sum() / (bg_pos.sum() + EPS)
    fg_loss = -(fg_pos * log_pos).sum() / (fg_pos.sum() + EPS)
    neg_loss = -(neg * log_neg).sum() / (neg.sum() + EPS)
    logs = {"bg_pos": float(bg_loss.detach()), "fg_pos": float(fg_loss.detach()), "neg": float(neg_loss.detach()),
            "pairs_bg": float(bg_pos.sum()), "pairs_fg": float(fg_pos.sum()), "pairs_neg": float(neg.sum())}
    return bg_loss / 4 + fg_loss / 4 + neg_loss / 2, logs


def affinity_loss(aff: torch.Tensor, label: torch.Tensor, radius: int = PSA_RADIUS) -> tuple[torch.Tensor, dict]:
    """The PSA loss of pair affinities ``aff`` (B, P, hs, ws) (:func:`pair_affinities`) under grid labels
    ``label`` (B, h, w). Returns (loss, {'bg_pos', 'fg_pos', 'neg': the three terms, 'pairs_*': their
    counts})."""
    bg_pos, fg_pos, neg = pair_labels(label.to(aff.device), radius)
    if bg_pos.shape != aff.shape:
        raise ValueError(f"affinity_loss: affinities {tuple(aff.shape)} do not fit labels {tuple(label.shape)} "
                         f"(pairs {tuple(bg_pos.shape)}): labels must be on the feature grid")
    return _psa_terms(aff, bg_pos, fg_pos, neg)


def grid_colour(image: torch.Tensor, valid: torch.Tensor, stride: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The colour of each stride-``stride`` grid cell of ImageNet-normalised crops, for the gated-CRF kernel:
    image (B, 3, H, W), valid (B, H, W) (1 on image pixels, 0 on padding), H and W multiples of ``stride`` ->
    (rgb (B, 3, h, w) in [0, 1], the mean over the cell's image pixels; valid (B, h, w) bool, more than half of
    the cell is image)."""
    mean = torch.as_tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    v = valid.unsqueeze(1).float()
    rgb = (image.float() * std + mean).clamp(0, 1) * v
    cover = F.avg_pool2d(v, stride)
    return F.avg_pool2d(rgb, stride) / cover.clamp(min=1e-6), cover[:, 0] > 0.5


def window_affinity_loss(f: torch.Tensor, label: torch.Tensor, rgb: torch.Tensor, valid: torch.Tensor,
                         radius: int = 3, gcrf_weight: float = 3.0, xy: float = 6.0, rgb_sigma: float = 0.1,
                         stride: int = 8) -> tuple[torch.Tensor, dict]:
    """A2GNN's affinity-CNN loss (related-methods.md §8, stage 2): the PSA loss (1/4 bg+, 1/4 fg+, 1/2 neg, as
    :func:`affinity_loss`) over every pair of the square window |dy|, |dx| <= ``radius`` (both directions, not
    PSA's half disc), plus ``gcrf_weight`` x the gated-CRF term sum_ij K_ij d_ij / (number of pairs), d_ij =
    mean_c |f_i - f_j| (the L1 feature distance, -log a_ij) and K the kernel of
    :func:`smaf.models.a2gnn.gated_crf_kernel` (xy in image pixels, colour in [0, 1]).

    f (B, D, h, w) features; label (B, h, w) grid labels (0 / c+1 / 255); rgb (B, 3, h, w), valid (B, h, w) bool
    from :func:`grid_colour`. Pairs touching padding or the grid's edge are left out. Returns (loss, {'bg_pos',
    'fg_pos', 'neg', 'gcrf', 'pairs_*'})."""
    if f.shape[-2:] != label.shape[-2:]:
        raise ValueError(f"window_affinity_loss: features {tuple(f.shape[-2:])} do not fit labels "
                         f"{tuple(label.shape[-2:])}: labels must be on the feature grid")
    offsets = [o for o in window_offsets(radius) if o != (0, 0)]
    dist = window_distances(f, offsets)                                               # (B, O, h, w)
    inside = window_mask(valid, offsets)
    label = label.to(f.device)
    loss, logs = _psa_terms(torch.exp(-dist), *_pair_sets(label.unsqueeze(1), neighbour_stack(label, offsets, IGNORE),
                                                          inside))
    kernel, _ = gated_crf_kernel(rgb.float(), valid, radius, xy, rgb_sigma, stride)   # same offsets, same order
    gcrf = (kernel * dist).sum() / inside.float().sum().clamp(min=1)
    logs["gcrf"] = float(gcrf.detach())
    return loss + gcrf_weight * gcrf, logs


class AffinityNet(nn.Module):
    """Backbone + the PSA affinity head (module docstring).

    Args:
        backbone: a module whose ``forward(x)`` returns a dict holding the keys of ``levels``.
        levels: ``((key, channels), ...)``, three feature levels (:data:`BACKBONE_LEVELS`).

    ``forward(x)`` with x (B, 3, H, W) ImageNet-normalised RGB returns f (B, 448, ceil(H/8), ceil(W/8)), on the
    grid of the first level (stride 8 on every backbone of :data:`BACKBONE_LEVELS`).
    """

    def __init__(self, backbone: nn.Module, levels):
        super().__init__()
        if len(levels) != len(LEVEL_WIDTHS):
            raise ValueError(f"AffinityNet needs {len(LEVEL_WIDTHS)} feature levels, got {len(levels)}")
        self.backbone = backbone
        self.level_keys = tuple(k for k, _ in levels)
        self.level_convs = nn.ModuleList(nn.Conv2d(int(ch), width, 1, bias=False)
                                         for (_, ch), width in zip(levels, LEVEL_WIDTHS))
        self.fuse_conv = nn.Conv2d(sum(LEVEL_WIDTHS), FEATURE_DIM, 1, bias=False)
        for conv in self.level_convs:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse_conv.weight, gain=4)

    def head_modules(self) -> list[nn.Module]:
        return [*self.level_convs, self.fuse_conv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, False)[0]

    def forward_with_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f (B, 448, h, w), levels (B, sum of the level widths, h, w)): the affinity features and the three
        backbone levels themselves, concatenated on f's stride-8 grid (coarser ones upsampled bilinearly), e.g.
        5632 channels on resnet38d (A2GNN's node features, :mod:`smaf.models.a2gnn`)."""
        return self._forward(x, True)

    def _forward(self, x: torch.Tensor, with_levels: bool):
        feats = self.backbone(x)
        size = feats[self.level_keys[0]].shape[-2:]
        parts, levels = [], []
        for key, conv in zip(self.level_keys, self.level_convs):
            level, y = feats[key], F.elu(conv(feats[key]))
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
                if with_levels:
                    level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            parts.append(y)
            if with_levels:
                levels.append(level)
        f = F.elu(self.fuse_conv(torch.cat(parts, 1))).contiguous()
        return f, (torch.cat(levels, 1) if with_levels else None)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        self.backbone.train(mode)   # the backbones keep their BatchNorm frozen in their own train()
        return self

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[backbone weights, backbone biases, head weights, head biases] (poly SGD: lr x1, x2, x10, x20);
        frozen parameters are in no group."""
        head_ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[2 * (id(param) in head_ids) + name.endswith("bias")].append(param)
        return groups


@register_architecture("affinity_net")
def build_affinity_net(backbone: str = "resnet38d", output_stride: int = 8, pretrained: str = "") -> AffinityNet:
    """AffinityNet on ``backbone`` (a key of :data:`BACKBONE_LEVELS`; ``output_stride`` for efficientnet_lite0
    and the MiT backbones: 8 or 16, f is at stride 8 either way). ``pretrained`` ('' = random init, a file, or 'imagenet') is not
    recorded in the architecture's arguments."""
    from . import build_backbone

    if backbone not in BACKBONE_LEVELS:
        raise ValueError(f"AffinityNet: backbone '{backbone}' has no affinity head; valid: "
                         f"{', '.join(sorted(BACKBONE_LEVELS))}")
    return AffinityNet(build_backbone(backbone, pretrained, output_stride), BACKBONE_LEVELS[backbone])
