"""PAR: pixel-adaptive refinement (AFA, related-methods.md §7), a training-free, appearance-driven propagation of
score maps, as a batched torch module and as a per-image refiner of CAM ``.npy`` dicts.

For every pixel i, PAR looks at its 8 neighbours j at each dilation d in {1, 2, 4, 8, 12, 24} (48 neighbours,
replicate padding at the border) and weighs them with

* an appearance kernel ``k_app(i, j) = -mean_rgb (|I_i - I_j| / (sigma_i * 0.3))^2``, sigma_i = the per-channel
  standard deviation of the 48 neighbour intensities of i (scale-free: any intensity range gives the same
  weights);
* a position kernel ``k_pos(j) = -(d_j / (sigma_d * 0.3))^2``, d_j = the dilation (x sqrt 2 on diagonals),
  sigma_d = the standard deviation of the 48 distances;

``w_ij = softmax_j(k_app) + 0.01 softmax_j(k_pos)``, then 10 iterations of ``m_i <- sum_j w_ij m_j``.

One difference from the reference: the weights are divided by their sum 1.01, so that each iteration is a
convex average (a constant map stays exactly constant, values stay in [0, 1]). The reference's maps grow by
1.01 per iteration instead; every argmax, and so every label, is the same.

Where a constant background score b is one of the channels, a convex average leaves it at b: PAR of
``[b; M]`` is ``[b; PAR(M)]``, so the refined fused maps ``PAR(M)`` are ordinary CAM dicts that any later step
(the same background rule, a CRF, the random walk, stage 2) reads like the originals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .pool import stack_cam_maps

#: AFA's constants (related-methods.md §7, step 4).
PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
PAR_ITERATIONS = 10
PAR_APP_SIGMA = 0.3
PAR_POS_SIGMA = 0.3
PAR_POS_WEIGHT = 0.01
#: AFA refines its training labels at half the crop resolution (§7, step 3).
PAR_SCALE = 0.5
#: AFA's two background scores of the training labels (§7, steps 2-3): high 0.55, low 0.35.
AFA_BG_HIGH = 0.55
AFA_BG_LOW = 0.35


def par_offsets(dilations=PAR_DILATIONS) -> tuple[list[tuple[int, int]], list[float]]:
    """The neighbourhood of PAR: ``(offsets, distances)`` with offsets ``(dy, dx)`` of the 8 neighbours at each
    dilation d (in the order of ``dilations``, then row-major) and their distances (d, or d sqrt 2 on
    diagonals). 48 offsets for AFA's 6 dilations."""
    offsets, distances = [], []
    for d in dilations:
        d = int(d)
        if d < 1:
            raise ValueError(f"PAR dilations must be >= 1, got {d}")
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if dy == 0 and dx == 0:
                    continue
                offsets.append((dy, dx))
                distances.append(d * (math.sqrt(2.0) if dy and dx else 1.0))
    return offsets, distances


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """The view of ``padded`` (..., h + 2 pad, w + 2 pad) holding, at (y, x), the input pixel (y + dy, x + dx)."""
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


class PAR(nn.Module):
    """Pixel-adaptive refinement (see the module docstring).

    Args:
        dilations: neighbourhood dilations (AFA: 1, 2, 4, 8, 12, 24).
        iterations: propagation steps (AFA: 10).
        app_sigma, pos_sigma: the 0.3 factors of the appearance and position kernels.
        pos_weight: weight of the position kernel's softmax (AFA: 0.01).

    ``forward(image, masks)``: image (B, 3, H, W) float (any intensity range), masks (B, K, H, W) float ->
    refined masks (B, K, H, W) (same dtype as masks). Batched, on the inputs' device; no parameters, runs under
    ``torch.no_grad`` (gradients through PAR are not needed by AFA or by the refinement step).
    """

    def __init__(self, dilations=PAR_DILATIONS, iterations: int = PAR_ITERATIONS, app_sigma: float = PAR_APP_SIGMA,
                 pos_sigma: float = PAR_POS_SIGMA, pos_weight: float = PAR_POS_WEIGHT):
        super().__init__()
        if int(iterations) < 0:
            raise ValueError(f"PAR iterations must be >= 0, got {iterations}")
        if app_sigma <= 0 or pos_sigma <= 0 or pos_weight < 0:
            raise ValueError(f"PAR: app_sigma and pos_sigma must be > 0 and pos_weight >= 0, got {app_sigma}, "
                             f"{pos_sigma}, {pos_weight}")
        self.offsets, distances = par_offsets(dilations)
        self.pad = max(int(d) for d in dilations)
        self.iterations = int(iterations)
        self.app_sigma, self.pos_weight = float(app_sigma), float(pos_weight)
        dist = torch.tensor(distances, dtype=torch.float64)
        pos = -(dist / (dist.std() + 1e-8) / float(pos_sigma)) ** 2
        self.register_buffer("pos_softmax", pos.softmax(0).float(), persistent=False)   # (J,)

    @torch.no_grad()
    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """The propagation weights (B, J, H, W) of an image (B, 3, H, W); each pixel's J weights sum to 1."""
        if image.dim() != 4:
            raise ValueError(f"PAR: image must be (B, C, H, W), got shape {tuple(image.shape)}")
        image = image.float()
        b, c, h, w = image.shape
        n = len(self.offsets)
        padded = F.pad(image, (self.pad,) * 4, mode="replicate")
        # sigma_i (per channel, over the n neighbours, unbiased) from running sums of I_j - I_i (the variance of
        # the neighbours; centred on I_i for precision): no (B, C, n, H, W) tensor
        total, squares = torch.zeros_like(image), torch.zeros_like(image)
        for dy, dx in self.offsets:
            d = _shifted(padded, self.pad, dy, dx, h, w) - image
            total += d
            squares.addcmul_(d, d)
        var = squares.sub_(total * total / n).div_(n - 1).clamp_(min=0.0)
        # 1 / (sigma * app_sigma)^2 / C: the mean over channels folded in
        inv = var.sqrt_().add_(1e-8).mul_(self.app_sigma).pow_(-2).div_(c)
        app = torch.empty((b, n, h, w), device=image.device, dtype=image.dtype)
        for j, (dy, dx) in enumerate(self.offsets):
            d = _shifted(padded, self.pad, dy, dx, h, w) - image
            app[:, j] = d.mul_(d).mul_(inv).sum(1).neg_()
        weights = app.softmax(1)                                                # (B, J, H, W)
        weights.add_(self.pos_weight * self.pos_softmax.to(weights.device).view(1, -1, 1, 1))
        return weights.div_(1.0 + self.pos_weight)

    @torch.no_grad()
    def propagate(self, masks: torch.Tensor, weights: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """``iterations`` (default: the module's) steps of m_i <- sum_j w_ij m_j: masks (B, K, H, W), weights
        (B, J, H, W) from :meth:`affinity`."""
        _, _, h, w = masks.shape
        if weights.shape[0] != masks.shape[0] or weights.shape[2:] != masks.shape[2:]:
            raise ValueError(f"PAR: masks {tuple(masks.shape)} and weights {tuple(weights.shape)} do not match")
        out = masks.float()
        for _ in range(self.iterations if iterations is None else int(iterations)):
            padded = F.pad(out, (self.pad,) * 4, mode="replicate")
            acc = torch.zeros_like(out)
            for j, (dy, dx) in enumerate(self.offsets):
                acc.addcmul_(weights[:, j:j + 1], _shifted(padded, self.pad, dy, dx, h, w))
            out = acc
        return out.to(masks.dtype)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != masks.shape[0] or image.shape[2:] != masks.shape[2:]:
            raise ValueError(f"PAR: image {tuple(image.shape)} and masks {tuple(masks.shape)} must share batch and "
                             f"size")
        return self.propagate(masks, self.affinity(image))


@dataclass(frozen=True)
class PARParams:
    """Constants of the PAR refinement step (config section ``par``)."""

    dilations: tuple = PAR_DILATIONS
    iterations: int = PAR_ITERATIONS
    app_sigma: float = PAR_APP_SIGMA
    pos_sigma: float = PAR_POS_SIGMA
    pos_weight: float = PAR_POS_WEIGHT
    scale: float = PAR_SCALE          # PAR runs on the image and maps resized by this factor (1 = full size)
    softmax: bool = False             # AFA refines softmax([b; M]); False refines [b; M] itself (same argmax
                                      # before refinement; the refined dict then holds PAR(M))

    @classmethod
    def from_config(cls, sect) -> "PARParams":
        from ..config import ConfigError

        params = cls(tuple(int(d) for d in sect.dilations), int(sect.iterations), float(sect.app_sigma),
                     float(sect.pos_sigma), float(sect.pos_weight), float(sect.scale), bool(sect.softmax))
        if not 0 < params.scale <= 1:
            raise ConfigError(f"par.scale={params.scale}: must be in (0, 1] (AFA: 0.5)")
        if not params.dilations or min(params.dilations) < 1:
            raise ConfigError(f"par.dilations={list(params.dilations)}: must be a non-empty list of integers >= 1")
        return params

    def module(self) -> PAR:
        return PAR(self.dilations, self.iterations, self.app_sigma, self.pos_sigma, self.pos_weight)


def image_tensor(image: np.ndarray, device) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float (1, 3, H, W) in [0, 1] on ``device``."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float().div_(255.0)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def par_refine_scores(par: PAR, image: torch.Tensor, scores: torch.Tensor, scale: float = PAR_SCALE) -> torch.Tensor:
    """PAR of score maps at ``scale`` of their size: image (B, 3, H, W), scores (B, K, H, W) -> (B, K, H, W)
    (computed at (H, W) x scale, bilinearly resized back)."""
    h, w = scores.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small_img = _resize(image.float(), size)
    small = _resize(scores.float(), size)
    return _resize(par(small_img, small), (h, w))


@torch.no_grad()
def refine_cams_with_background(par: PAR, images: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor,
                                bg_high: float = AFA_BG_HIGH, bg_low: float = AFA_BG_LOW, scale: float = PAR_SCALE,
                                valid: torch.Tensor | None = None, ignore_index: int = 255) -> torch.Tensor:
    """AFA's PAR labels inside a training step (§7, steps 2-3), batched on the device.

    Args:
        par: a :class:`PAR` module.
        images: (B, 3, H, W) the batch's crops (any intensity range).
        cams: (B, C, h, w) CAMs of the C foreground classes in [0, 1] (any resolution: resized to (H, W)).
        labels: (B, C) image-level labels (1 = present).
        bg_high, bg_low: the two background scores (AFA 0.55, 0.35).
        scale: PAR runs at this fraction of (H, W) (AFA 0.5).
        valid: optional (B, H, W) bool, False on crop padding (-> ``ignore_index``).

    Returns (B, H, W) long labels: for each score, argmax of PAR(softmax over [score; labelled CAMs]); the label
    of the high score, with its background set to ``ignore_index``, and background where both say background
    (:func:`refine_scores_with_background`).
    """
    h, w = images.shape[-2:]
    cams = _resize(cams.float(), (h, w))
    present = labels > 0.5
    scores = []
    for score in (bg_high, bg_low):
        with_bg = torch.cat([torch.full_like(cams[:, :1], float(score)), cams], dim=1)
        # softmax over the background and the labelled classes only; the other channels are 0
        keep = torch.cat([present.new_ones(present.shape[0], 1), present], dim=1)[:, :, None, None]
        scores.append(with_bg.masked_fill(~keep, float("-inf")).softmax(1))
    return refine_scores_with_background(par, images, scores[0], scores[1], labels, scale, valid, ignore_index)


@torch.no_grad()
def refine_scores_with_background(par: PAR, images: torch.Tensor, high_scores: torch.Tensor,
                                  low_scores: torch.Tensor, labels: torch.Tensor, scale: float = PAR_SCALE,
                                  valid: torch.Tensor | None = None, ignore_index: int = 255) -> torch.Tensor:
    """AFA's two-background label rule on score maps that already hold their background channel.

    Args:
        images: (B, 3, H, W) the crops PAR reads (any intensity range).
        high_scores, low_scores: (B, 1 + C, h, w) scores made with the high and the low background score
            (channel 0 background, channel c+1 class c; any resolution: resized bilinearly to (H, W)).
        labels: (B, C) image-level labels; only the background and the labelled classes compete.
        scale, valid, ignore_index: as :func:`refine_cams_with_background`.

    Returns (B, H, W) long labels in VOC numbering: per score, argmax over the background and the labelled
    classes of PAR(scores) at ``scale`` of (H, W); then the high score's label where it is foreground,
    background where both say background, ``ignore_index`` where only the low one does (the uncertain band)
    and on padding.
    """
    b = images.shape[0]
    h, w = images.shape[-2:]
    out = torch.full((b, h, w), ignore_index, dtype=torch.long, device=images.device)
    for i in range(b):
        channels = torch.cat([labels.new_zeros(1, dtype=torch.long),
                              torch.nonzero(labels[i] > 0.5).flatten() + 1])
        high, low = (channels[par_refine_scores(par, images[i:i + 1], _resize(s[i:i + 1, channels].float(), (h, w)),
                                                scale)[0].argmax(0)]
                     for s in (high_scores, low_scores))
        label = high.clone()
        label[high == 0] = ignore_index
        label[(high == 0) & (low == 0)] = 0
        out[i] = label
    if valid is not None:
        out[~valid.bool()] = ignore_index
    return out


class PARRefiner:
    """Per-image refiner of CAM ``.npy`` dicts (protocol of :mod:`smaf.refine.pool`): scores [b; M_c for the
    labelled c], b = the image's background score under ``bg_rule`` (of the input maps), PAR at
    ``params.scale`` of the image size, bilinearly back to the image size, argmax -> VOC label map.

    :meth:`refine_scores` also returns the refined dict ``{c: (H, W) float32}`` (PAR(M) when
    ``params.softmax`` is False; the refined softmax scores of the classes otherwise), which
    :func:`~smaf.refine.pool.refine_folder` writes when given ``npy_dir``.

    ``device``: where PAR runs ('cpu', 'cuda', a torch.device); in a process pool use the CPU.
    """

    input_kind = "npy"
    name = "par"

    def __init__(self, params: PARParams = PARParams(), bg_rule=None, device="cpu"):
        from ..cam.background import BackgroundRule

        self.params = params
        self.bg_rule = bg_rule if bg_rule is not None else BackgroundRule()
        self.device = torch.device(device)
        self._par = None

    def _module(self) -> PAR:
        if self._par is None:   # built on first use (in the worker that uses it)
            self._par = self.params.module().to(self.device)
        return self._par

    @torch.no_grad()
    def refine_scores(self, image: np.ndarray, cams: dict, labelled: list) -> tuple[np.ndarray, dict]:
        """image RGB uint8 (H, W, 3), cams ``{c: (H, W)}`` -> (uint8 (H, W) label map, refined dict)."""
        h, w = image.shape[:2]
        keys = sorted(cams)
        if not keys:
            return np.zeros((h, w), np.uint8), {}
        maps = stack_cam_maps(cams, keys, (h, w), self.device)
        b = float(self.bg_rule(maps))
        scores = torch.cat([torch.full_like(maps[:1], b), maps])
        if self.params.softmax:
            scores = scores.softmax(0)
        refined = par_refine_scores(self._module(), image_tensor(image, self.device), scores[None],
                                    self.params.scale)[0]
        lut = np.array([0] + [k + 1 for k in keys], np.uint8)
        label = lut[refined.argmax(0).cpu().numpy()]
        fg = refined[1:].clamp_(0.0, 1.0).cpu().numpy()
        return label, {k: fg[i] for i, k in enumerate(keys)}

    def __call__(self, image: np.ndarray, cams: dict, labelled: list) -> np.ndarray:
        return self.refine_scores(image, cams, labelled)[0]
