"""Affinity labels for AffinityNet (PSA, related-methods.md §1.7) from any folder of CAM ``.npy`` dicts, and the
training samples that carry them.

Two background scores make two labellings of an image's maps M (labelled classes only):

* la (the "low alpha" one): a generous background, so its foreground is confident;
* ha (the "high alpha" one): a small background, so its background is confident.

The affinity label is argmax(la) where la says foreground (c+1), 0 where ha says background, 255 (unknown)
elsewhere: ``label = argmax(la); label[la = bg] = 255; label[ha = bg] = 0``.

Where the background scores come from (``train_aff.labels.mode``):

* ``power`` (PSA, for CAM maps): the power background (1 - max_c M_c)^alpha with alpha_la = 4 and alpha_ha = 32
  (PSA; SEAM and PPC use 24 for ha);
* ``scores``: two constants ``bg_scores = [low, high]`` (high for la, low for ha), for fused maps with a constant
  background rule;
* ``rule``: the run's background rule (``inference.bg_method``: fixed or per-image Otsu) b, with la at b + margin and
  ha at b - margin (clamped to [0, 1]).

Each labelling is the argmax over [background; M] after the dense CRF of those scores (unary -log p,
``unary_from_softmax``, not renormalised; PSA's ``crf_inference`` constants: Gaussian 3/3, bilateral 80/13/10,
10 iterations), or of the scores themselves with ``crf: false``.

Labels are written as label PNGs (``<train_aff.out_subdir>/aff_labels/<id>.png``) at image size.
:class:`AffinityDataset` crops them with the image and reduces them to the stride-8 grid by a majority vote
over each 8 x 8 cell (PSA average-pools the two CRF score maps 8 x 8 before the argmax; the vote over the
labels made at full resolution is the label-map counterpart), with crop padding 255.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .crf import CRFParams, crf_refine_scores
from .pool import stack_cam_maps

LABEL_MODES = ("power", "scores", "rule")
IGNORE = 255
#: PSA's crf_inference constants (related-methods.md §1.5); gt_prob is unused by the score CRF.
PSA_CRF = CRFParams(gt_prob=0.7, gauss_sxy=3, gauss_compat=3, bi_sxy=80, bi_srgb=13, bi_compat=10, iterations=10)


@dataclass(frozen=True)
class AffinityLabelParams:
    """How affinity labels are made (config ``train_aff.labels``; see the module docstring)."""

    mode: str = "power"
    alpha_la: float = 4.0
    alpha_ha: float = 32.0
    bg_scores: tuple = (0.1, 0.3)     # (low: ha, high: la)
    rule_margin: float = 0.1
    crf: bool = True
    crf_params: CRFParams = PSA_CRF

    def __post_init__(self):
        if self.mode not in LABEL_MODES:
            raise ValueError(f"affinity label mode {self.mode!r}: expected one of {', '.join(LABEL_MODES)}")
        if len(self.bg_scores) != 2 or self.bg_scores[0] > self.bg_scores[1]:
            raise ValueError(f"affinity label bg_scores {list(self.bg_scores)}: expected [low, high] with low <= high")

    @classmethod
    def from_config(cls, sect) -> "AffinityLabelParams":
        """From the ``train_aff.labels`` section; a bad value is a ConfigError naming the key."""
        from ..config import ConfigError

        try:
            crf = CRFParams(0.7, float(sect.gauss_sxy), float(sect.gauss_compat), float(sect.bi_sxy),
                            float(sect.bi_srgb), float(sect.bi_compat), int(sect.iterations))
            return cls(str(sect.mode), float(sect.alpha_la), float(sect.alpha_ha),
                       tuple(float(v) for v in sect.bg_scores), float(sect.rule_margin), bool(sect.crf), crf)
        except ValueError as err:
            raise ConfigError(f"train_aff.labels: {err}") from None


def _labelling(image: np.ndarray, bg: np.ndarray, maps: np.ndarray, params: AffinityLabelParams) -> np.ndarray:
    """argmax over [bg; maps] (K+1, H, W) after the score CRF (or without): int (H, W), 0 = background."""
    scores = np.concatenate([np.broadcast_to(bg, maps[:1].shape), maps]).astype(np.float32)
    if params.crf:
        scores = crf_refine_scores(image, scores, params.crf_params)
    return scores.argmax(0)


def affinity_label(image: np.ndarray, cams: dict, params: AffinityLabelParams = AffinityLabelParams(),
                   bg_rule=None) -> np.ndarray:
    """The affinity label of one image: RGB uint8 (H, W, 3), cams ``{c: (H, W) in [0, 1]}`` -> uint8 (H, W) with
    0 = confident background, c+1 = confident class c, 255 = unknown (module docstring). ``bg_rule``
    (:class:`~smaf.cam.background.BackgroundRule`) is used by mode ``rule``. No maps: all background."""
    h, w = image.shape[:2]
    keys = sorted(cams)
    if not keys:
        return np.zeros((h, w), np.uint8)
    maps = stack_cam_maps(cams, keys, (h, w))
    if params.mode == "power":
        base = np.clip(1.0 - maps.max(0, keepdims=True), 0.0, 1.0)
        bg_la, bg_ha = base ** params.alpha_la, base ** params.alpha_ha
    elif params.mode == "scores":
        bg_ha, bg_la = (np.float32(v) for v in params.bg_scores)
    else:
        if bg_rule is None:
            raise ValueError("affinity label mode 'rule' needs the run's background rule")
        b = float(bg_rule(maps))
        bg_la, bg_ha = np.float32(min(1.0, b + params.rule_margin)), np.float32(max(0.0, b - params.rule_margin))
    la = _labelling(image, bg_la, maps, params)
    ha = _labelling(image, bg_ha, maps, params)
    lut = np.array([0] + [k + 1 for k in keys], np.uint8)
    label = lut[la]
    label[la == 0] = IGNORE
    label[ha == 0] = 0
    return label


class AffinityLabelRefiner:
    """Per-image "refiner" (protocol of :mod:`smaf.refine.pool`) that turns CAM ``.npy`` dicts into affinity
    labels (:func:`affinity_label`), so :func:`~smaf.refine.pool.refine_folder` makes a folder of them in a
    process pool, resumably."""

    input_kind = "npy"
    name = "afflabel"

    def __init__(self, params: AffinityLabelParams = AffinityLabelParams(), bg_rule=None):
        self.params, self.bg_rule = params, bg_rule

    def __call__(self, image: np.ndarray, cams: dict, labelled: list) -> np.ndarray:
        return affinity_label(image, cams, self.params, self.bg_rule)


def majority_downsample(label: np.ndarray, stride: int = 8) -> np.ndarray:
    """uint8 (H, W) with H, W multiples of ``stride`` -> (H/stride, W/stride): the most frequent value of each
    stride x stride cell (255 included; ties go to the smaller value)."""
    h, w = label.shape
    if h % stride or w % stride:
        raise ValueError(f"majority_downsample: {h}x{w} is not a multiple of {stride}")
    cells = label.reshape(h // stride, stride, w // stride, stride).transpose(0, 2, 1, 3).reshape(
        h // stride, w // stride, stride * stride)
    values = np.unique(cells)
    counts = np.stack([(cells == v).sum(-1) for v in values])
    return values[counts.argmax(0)].astype(np.uint8)


def crop_label(label: np.ndarray, params: dict) -> np.ndarray:
    """Apply a :class:`~smaf.data.transforms.JointTrainTransform`'s geometry (its ``params``) to a label map:
    nearest resize to the scaled size, flip, crop into a ``crop`` x ``crop`` canvas of 255."""
    h, w = params["scaled_size"]
    if label.shape != (h, w):
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    if params["flip"]:
        label = label[:, ::-1]
    c = params["crop"]
    out = np.full((c, c), IGNORE, np.uint8)
    ct, cl, it, il, ch, cw = (params[k] for k in ("cont_top", "cont_left", "img_top", "img_left", "ch", "cw"))
    out[ct:ct + ch, cl:cl + cw] = label[it:it + ch, il:il + cw]
    return out


class AffinityDataset(Dataset):
    """Training samples of AffinityNet: the image under a :class:`~smaf.data.transforms.JointTrainTransform`
    (resize, flip, jitter, crop) and its affinity label (``label_dir/<id>.png``) under the same geometry, reduced
    to the stride-8 grid (:func:`majority_downsample`).

    Items (for :func:`~smaf.data.voc.collate_train`): ``id``; ``image`` float32 (3, crop, crop); ``valid``
    float32 (crop, crop) (1 on image pixels, 0 on padding: the gated-CRF term's mask); ``aff_label``
    int64 (crop/8, crop/8), 0 / c+1 / 255; ``labels`` float32 (C,); ``params``. Keys are an index or (index,
    seed), as for :class:`~smaf.data.voc.ClassificationDataset`.
    """

    def __init__(self, layout, ids: list, transform, label_dir: str | os.PathLike, stride: int = 8):
        from ..data.voc import DatasetError

        self.layout, self.ids, self.transform = layout, list(ids), transform
        self.label_dir, self.stride = Path(label_dir), int(stride)
        if transform.crop % self.stride:
            raise DatasetError(f"affinity crop {transform.crop} is not a multiple of {self.stride}: set "
                               f"train_aff.crop to a multiple of {self.stride} (PSA: 448)")
        missing = [i for i in self.ids if not (self.label_dir / f"{i}.png").is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} affinity labels missing in '{self.label_dir}' (first: {missing[0]}.png)"
                               f": the train_aff stage makes them from the CAM folder train_aff.cam_dir")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> dict:
        from ..io import load_label_png

        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), None)
        image_id = self.ids[index]
        rng = np.random.default_rng(seed)
        image = self.layout.load_image(image_id)
        label = load_label_png(self.label_dir / f"{image_id}.png")
        if label.shape != image.shape[:2]:
            from ..data.voc import DatasetError

            raise DatasetError(f"affinity label '{self.label_dir / image_id}.png' is {label.shape} but the image is "
                               f"{image.shape[:2]}: delete the label folder and re-run train_aff")
        out = self.transform(rng, image)
        grid = majority_downsample(crop_label(label, out["params"]), self.stride)
        return {"id": image_id, "image": torch.from_numpy(out["image"]), "valid": torch.from_numpy(out["valid"]),
                "aff_label": torch.from_numpy(grid.astype(np.int64)),
                "labels": torch.from_numpy(self.layout.labels[image_id].copy()), "params": out["params"]}


def label_statistics(label_dir: Path, ids: list) -> dict:
    """Fractions of background / foreground / unknown pixels over the affinity labels of ``ids``."""
    from ..io import load_label_png

    counts = np.zeros(3, np.int64)
    for image_id in ids:
        label = load_label_png(label_dir / f"{image_id}.png")
        counts += [(label == 0).sum(), ((label > 0) & (label < IGNORE)).sum(), (label == IGNORE).sum()]
    total = max(1, int(counts.sum()))
    return {"background": counts[0] / total, "foreground": counts[1] / total, "unknown": counts[2] / total}
