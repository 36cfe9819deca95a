"""A2GNN's confident seeds from any folder of CAM ``.npy`` dicts (image-level case; related-methods.md §8,
stage 1).

For an image's maps M (K labelled classes, (K, H, W) in [0, 1]):

1. Two dense-CRF labellings as in PSA (:mod:`smaf.refine.affinity_labels`): la on [(1 - max M)^4; M] and ha on
   [(1 - max M)^24; M] (PSA's ``crf_inference`` constants, §1.5), marginals q_la, q_ha (K+1, H, W). The PSA label
   is argmax(q_la) (c+1), 255 where la says background, 0 where ha says background.
2. A foreground pixel labelled c+1 stays a seed only inside class c's CAM argmax region (argmax_k M_k = c) and in
   the top 40 % of that region: M_c >= the 60th percentile of the region's values M_c > 0.01.
3. A background pixel stays a seed only where (1 - max M)^24 > 0.8 (max M < 1 - 0.8^(1/24) ~ 0.0093).
4. A seed whose labelling is unsure is dropped: max_k q_la < 0.8 for a foreground seed, max_k q_ha < 0.8 for a
   background seed -> 255 (the spec's "max CRF confidence < 0.8"; the confidence is read from the labelling that
   gave the pixel its label).

Everything else is 255 (unlabelled). Seeds are written as label PNGs at image size (0 background, c+1 class c,
255 unlabelled). With ``crf=False`` the marginals are the scores divided by their per-pixel sum (tests, quick
runs).

Padding: wherever an image is padded (to a multiple of the stride for the graph, or into a crop), seeds are
padded with 255 (:func:`pad_seeds`), never 0: the reference pads its image-level seeds with 0, which turns the
padding into background seeds (§8; its box script pads with 255).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .affinity_labels import PSA_CRF
from .crf import CRFParams, crf_refine_scores
from .pool import stack_cam_maps

IGNORE = 255


#: ``a2gnn.seeds.shift``: ``none`` (the maps as they are: the spec) or ``bg_rule`` (shifted by the image's
#: background score of the ``inference`` rule, so that the rule's background sits at 0 as in PSA's ReLU CAMs).
SEED_SHIFTS = ("none", "bg_rule")


@dataclass(frozen=True)
class SeedParams:
    """Constants of the seed rule (config ``a2gnn.seeds``; all from related-methods.md §8)."""

    alpha_la: float = 4.0           # la labelling: power background (1 - max M)^4
    alpha_ha: float = 24.0          # ha labelling: (1 - max M)^24 (SEAM's ha, which A2GNN uses)
    top_fraction: float = 0.4       # foreground: the top 40 % of each class region
    cam_floor: float = 0.01         # the percentile is over the region's values > 0.01
    bg_power: float = 24.0          # background seeds where (1 - max M)^24 > bg_min
    bg_min: float = 0.8
    min_confidence: float = 0.8     # max CRF marginal below this -> 255
    crf: bool = True
    crf_params: CRFParams = PSA_CRF
    # maps -> background score of the image (a BackgroundRule) or None: with it, every map is shifted to
    # clip((M - t) / (1 - t), 0, 1) first (docs/a2gnn.md, "Seeds of maps with a floor")
    shift: object = None

    def __post_init__(self):
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"seed top_fraction {self.top_fraction}: expected a value in (0, 1]")

    @classmethod
    def from_config(cls, sect, inference=None) -> "SeedParams":
        """From the ``a2gnn.seeds`` section (the CRF constants: PSA's ``crf_inference``); ``shift: bg_rule``
        takes the background rule of the ``inference`` section (``bg_method``, ``bg_threshold``), ``none`` the
        maps as they are."""
        from ..cam.background import BackgroundRule
        from ..config import ConfigError

        shift = str(sect.get("shift", "none"))
        if shift not in SEED_SHIFTS:
            raise ConfigError(f"a2gnn.seeds.shift={shift!r}: expected one of {', '.join(SEED_SHIFTS)}")
        if shift == "bg_rule" and inference is None:
            raise ConfigError("a2gnn.seeds.shift=bg_rule needs the inference section's background rule")
        try:
            return cls(float(sect.alpha_la), float(sect.alpha_ha), float(sect.top_fraction), float(sect.cam_floor),
                       float(sect.bg_power), float(sect.bg_min), float(sect.min_confidence), bool(sect.crf),
                       shift=BackgroundRule.from_section(inference, "inference") if shift == "bg_rule" else None)
        except (ValueError, KeyError, AttributeError) as err:
            raise ConfigError(f"a2gnn.seeds: {err}") from None


def _marginals(image: np.ndarray, scores: np.ndarray, params: SeedParams) -> np.ndarray:
    """(K+1, H, W) marginals of the scores: the dense CRF's, or the scores over their per-pixel sum."""
    if params.crf:
        return crf_refine_scores(image, scores, params.crf_params)
    return scores / np.maximum(scores.sum(0, keepdims=True), 1e-12)


def confident_seeds(image: np.ndarray, cams: dict, params: SeedParams = SeedParams()) -> np.ndarray:
    """A2GNN seeds of one image (module docstring).

    Args:
        image: RGB uint8 (H, W, 3) (used by the CRF).
        cams: ``{class c: (H, W) float in [0, 1]}``, labelled classes only, at image size.
        params: the rule's constants.

    Returns uint8 (H, W): 0 background seed, c+1 seed of class c, 255 unlabelled. No maps: only the
    background rule applies (max M = 0 everywhere: every pixel a background seed).
    """
    h, w = image.shape[:2]
    keys = sorted(cams)
    if not keys:
        return np.zeros((h, w), np.uint8)
    maps = stack_cam_maps(cams, keys, (h, w))
    if params.shift is not None:   # the rule's zeros are where the image's own background rule says background
        t = min(float(params.shift(maps)), 1.0 - 1e-6)
        maps = np.clip((maps - t) / (1.0 - t), 0.0, 1.0).astype(np.float32)
    peak = maps.max(0)
    base = np.clip(1.0 - peak, 0.0, 1.0)
    q_la = _marginals(image, np.concatenate([base[None] ** params.alpha_la, maps]).astype(np.float32), params)
    q_ha = _marginals(image, np.concatenate([base[None] ** params.alpha_ha, maps]).astype(np.float32), params)
    la, ha = q_la.argmax(0), q_ha.argmax(0)

    seeds = np.full((h, w), IGNORE, np.uint8)
    cam_argmax = maps.argmax(0)
    la_confident = q_la.max(0) >= params.min_confidence
    for k, c in enumerate(keys):
        region = cam_argmax == k
        values = maps[k][region & (maps[k] > params.cam_floor)]
        if values.size == 0:
            continue
        threshold = np.percentile(values, 100.0 * (1.0 - params.top_fraction))
        keep = (la == k + 1) & (ha != 0) & region & (maps[k] >= threshold) & la_confident
        seeds[keep] = c + 1
    background = (ha == 0) & (base ** params.bg_power > params.bg_min) & (q_ha.max(0) >= params.min_confidence)
    seeds[background] = 0
    return seeds


def pad_seeds(seeds: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Seeds (H, W) padded at the bottom and right to ``size`` = (H', W') >= (H, W) with 255 (unlabelled, never
    background: the reference's bug, module docstring)."""
    h, w = seeds.shape
    if size[0] < h or size[1] < w:
        raise ValueError(f"pad_seeds: {seeds.shape} does not fit in {tuple(size)}")
    out = np.full(tuple(size), IGNORE, np.uint8)
    out[:h, :w] = seeds
    return out


class SeedRefiner:
    """Per-image "refiner" (protocol of :mod:`smaf.refine.pool`): CAM ``.npy`` dict -> A2GNN seed map
    (:func:`confident_seeds`), so :func:`~smaf.refine.pool.refine_folder` makes a folder of seed PNGs in a process
    pool, resumably."""

    input_kind = "npy"
    name = "seeds"

    def __init__(self, params: SeedParams = SeedParams()):
        self.params = params

    def __call__(self, image: np.ndarray, cams: dict, labelled: list) -> np.ndarray:
        return confident_seeds(image, cams, self.params)


def seed_statistics(seeds: np.ndarray) -> dict:
    """Fractions of background / foreground / unlabelled pixels of a seed map (or of several, concatenated)."""
    total = max(1, seeds.size)
    return {"background": float((seeds == 0).sum() / total),
            "foreground": float(((seeds > 0) & (seeds < IGNORE)).sum() / total),
            "unlabelled": float((seeds == IGNORE).sum() / total)}
