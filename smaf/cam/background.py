"""The background score of fused maps: a pixel is background when every labelled class map is at or below it.

``fixed`` uses one constant for every image (the spec's 0.20, for softmax maps of an EPS classifier);
``otsu`` takes each image's Otsu threshold of its per-pixel maximum (no ground truth, no tuning).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fusion import FusedResult

BG_METHODS = ("fixed", "otsu")


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float | None:
    """Otsu's threshold of scores in [0, 1] (any shape, any device).

    The values are histogrammed into ``bins`` equal bins; the returned t is the bin edge that maximises the
    between-class variance w0 w1 (mu0 - mu1)^2 of {values < t} and {values >= t}. Returns None when no edge
    separates two non-empty classes (all values in one bin).
    """
    v = values.detach().float().flatten().clamp(0.0, 1.0)
    hist = torch.histc(v, bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) / bins
    w0 = hist.cumsum(0)
    m0 = (hist * centres).cumsum(0)
    total, mean_total = w0[-1], m0[-1]
    den = w0 * (total - w0)
    # (total w0 w1 (mu0 - mu1)^2 = (mean_total w0 - total m0)^2 / (w0 w1)): same argmax, no divisions by 0
    between = torch.where(den > 0, (mean_total * w0 - total * m0) ** 2 / den.clamp(min=1e-12),
                          torch.zeros_like(den))
    if float(between.max()) <= 0:
        return None
    return (int(between.argmax()) + 1) / bins


def background_score(maps, method: str = "fixed", fixed: float = 0.2) -> float:
    """The background score of one image: argmax over [score; maps] labels a pixel background.

    Args:
        maps: (K, H, W) fused maps of the image's labelled classes in [0, 1] (torch tensor or NumPy array).
        method: ``fixed`` -> ``fixed`` for every image (the spec's 0.20 suits softmax maps of a model with a
            background channel); ``otsu`` -> Otsu's threshold of the per-pixel maximum over the K maps, a
            per-image rule that needs no ground truth and adapts to how far a ReLU CAM spreads.
        fixed: the constant (also the fallback for ``otsu`` when K = 0 or the maps are flat).
    """
    if method == "fixed":
        return float(fixed)
    if method != "otsu":
        raise ValueError(f"background method {method!r}: expected one of {', '.join(BG_METHODS)}")
    if len(maps) == 0:
        return float(fixed)
    maps = torch.as_tensor(maps)
    t = otsu_threshold(maps.amax(0))
    return float(fixed) if t is None else t


@dataclass(frozen=True)
class BackgroundRule:
    """How an image's background score is chosen (config: ``<section>.bg_method`` and the section's threshold).

    ``rule(maps) -> float`` with maps (K, H, W) of the labelled classes; see :func:`background_score`."""

    method: str = "fixed"
    threshold: float = 0.2

    def __post_init__(self):
        if self.method not in BG_METHODS:
            raise ValueError(f"bg_method={self.method!r}: expected one of {', '.join(BG_METHODS)}")

    @classmethod
    def from_section(cls, sect, section: str) -> "BackgroundRule":
        """The rule of config section ``section`` (its ``bg_method`` and ``bg_threshold``); a bad method is a
        :class:`~smaf.config.ConfigError` naming the key."""
        from ..config import ConfigError

        method = str(sect.get("bg_method", "fixed"))
        if method not in BG_METHODS:
            raise ConfigError(f"{section}.bg_method={method!r}: expected one of {', '.join(BG_METHODS)} (fix the "
                              f"config or override it, e.g. {section}.bg_method=otsu)")
        return cls(method, float(sect.bg_threshold))

    def __call__(self, maps) -> float:
        return background_score(maps, self.method, self.threshold)

    def score_cam_dict(self, cams: dict) -> float:
        """The score of a saved CAM dict ``{class: (H, W) map}`` (:func:`smaf.io.load_cam_dict`)."""
        return self(torch.stack([torch.as_tensor(cams[k]) for k in sorted(cams)]) if cams else [])

    @property
    def report_value(self):
        """What reports store as ``bg_threshold``: the constant for ``fixed``, else the method name."""
        return self.threshold if self.method == "fixed" else self.method

    def __str__(self) -> str:
        if self.method == "fixed":
            return f"fixed {self.threshold:.2f}"
        return f"per-image Otsu (fallback {self.threshold:.2f})"


def label_from_maps(result: FusedResult, bg_threshold: float) -> torch.Tensor:
    """VOC label map (H, W) uint8 on the maps' device: argmax over [bg_threshold; fused maps]."""
    maps = result.maps
    if not result.classes:
        return torch.zeros(maps.shape[1:], dtype=torch.uint8, device=maps.device)
    bg = torch.full((1, *maps.shape[1:]), float(bg_threshold), device=maps.device)
    idx = torch.cat([bg, maps]).argmax(0)
    lut = torch.tensor([0] + [c + 1 for c in result.classes], dtype=torch.uint8, device=maps.device)
    return lut[idx]
