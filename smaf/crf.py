"""Dense CRF refinement of label maps (pydensecrf), with explicit parameters.

The SMAF pseudo-mask CRF uses a label unary (gt_prob 0.7), a Gaussian pairwise term (sxy 3, compat 3),
a bilateral term (sxy 50, srgb 5, compat 10) and 10 mean-field iterations (smaf.md stage 3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CRFParams:
    gt_prob: float = 0.7
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bi_sxy: float = 50
    bi_srgb: float = 5
    bi_compat: float = 10
    iterations: int = 10

    @classmethod
    def from_config(cls, sect) -> "CRFParams":
        return cls(float(sect.gt_prob), float(sect.gauss_sxy), float(sect.gauss_compat), float(sect.bi_sxy),
                   float(sect.bi_srgb), float(sect.bi_compat), int(sect.iterations))


def crf_refine_labels(image: np.ndarray, label: np.ndarray, params: CRFParams = CRFParams(),
                      extra_labels=()) -> np.ndarray:
    """Refine a label map with a dense CRF.

    Args:
        image: RGB uint8 (H, W, 3).
        label: uint8 (H, W) VOC label map (0 background, c+1 class c; 255 = unknown, given a uniform unary).
        params: CRF constants.
        extra_labels: further label values allowed in the output (e.g. the image's labelled classes + 1).

    Returns the uint8 (H, W) argmax of the CRF marginals, over the labels present in ``label`` (and
    ``extra_labels``) and background.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = label.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
    values = sorted({0, *np.unique(label[label != 255]).tolist(), *[int(v) for v in extra_labels]})
    if len(values) == 1:
        return np.zeros_like(label, dtype=np.uint8)
    lut = np.zeros(256, dtype=np.int64)
    lut[values] = np.arange(1, len(values) + 1)   # 1..n; 0 means "unsure" for unary_from_labels
    compact = lut[label]
    unary = unary_from_labels(compact, len(values), gt_prob=params.gt_prob, zero_unsure=True)
    crf = dcrf.DenseCRF2D(w, h, len(values))
    # pydensecrf needs C-contiguous, writable buffers (decoded images are often read-only views).
    crf.setUnaryEnergy(np.array(unary, dtype=np.float32, order="C"))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bi_sxy, srgb=params.bi_srgb,
                             rgbim=np.array(image, dtype=np.uint8, order="C"), compat=params.bi_compat)
    q = np.array(crf.inference(params.iterations)).reshape(len(values), h, w)
    return np.asarray(values, dtype=np.uint8)[q.argmax(0)]
