"""Dense CRF (pydensecrf) of label maps and of soft score maps, with explicit parameters.

* :func:`crf_refine_labels`: a label unary (``unary_from_labels``, gt_prob) on a label map. The SMAF
  pseudo-mask CRF: gt_prob 0.7, Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10, 10 mean-field
  iterations (smaf.md stage 3).
* :func:`crf_refine_scores`: a softmax unary (``unary_from_softmax``) on per-pixel scores, e.g. [(1 - max)^alpha;
  CAMs] as PSA / SEAM / EPS / A2GNN do for their la/ha and random-walk inputs (related-methods.md §1.5); returns
  the marginals.

:class:`CRFLabelRefiner` and :class:`CRFScoreRefiner` wrap them as per-image refiners for
:func:`smaf.refine.pool.refine_folder`.
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
                      extra_labels=(), num_labels: int | None = None) -> np.ndarray:
    """Refine a label map with a dense CRF.

    Args:
        image: RGB uint8 (H, W, 3).
        label: uint8 (H, W) VOC label map (0 background, c+1 class c; 255 = unknown, given a uniform unary).
        params: CRF constants.
        extra_labels: further label values allowed in the output (e.g. the image's labelled classes + 1).
        num_labels: K = C+1 to build the unary over all labels 0..K-1, as the reference does (off-label energy
            -log((1 - gt_prob) / (K - 1))); None = over the labels present in ``label``, ``extra_labels`` and
            background only.

    Returns the uint8 (H, W) argmax of the CRF marginals.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = label.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
    present = {0, *np.unique(label[label != 255]).tolist(), *[int(v) for v in extra_labels]}
    if num_labels is not None:
        if max(present) >= num_labels:
            raise ValueError(f"label value {max(present)} does not fit num_labels={num_labels}")
        if len(present) == 1:   # one label everywhere: the CRF cannot change it
            return np.zeros_like(label, dtype=np.uint8)
        values = list(range(num_labels))
    else:
        values = sorted(present)
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


def crf_refine_scores(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Dense-CRF marginals of soft scores.

    Args:
        image: RGB uint8 (H, W, 3).
        probs: float (K, H, W) non-negative scores, one channel per label (not renormalised: the unary is
            -log(p) as ``unary_from_softmax`` computes it, as the PSA-lineage ``crf_inference`` does).
        params: CRF constants (``gt_prob`` unused).

    Returns float32 (K, H, W) marginals (each pixel sums to 1).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and scores {probs.shape[1:]} sizes differ")
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.array(unary_from_softmax(np.asarray(probs, dtype=np.float32)), dtype=np.float32,
                                order="C"))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bi_sxy, srgb=params.bi_srgb,
                             rgbim=np.array(image, dtype=np.uint8, order="C"), compat=params.bi_compat)
    return np.array(crf.inference(params.iterations), dtype=np.float32).reshape(k, h, w)


class CRFLabelRefiner:
    """Per-image refiner of label PNGs (:func:`crf_refine_labels`); the image's labelled classes are allowed in
    the output even where the input has none of their pixels."""

    input_kind = "png"
    name = "crf"

    def __init__(self, params: CRFParams = CRFParams(), num_labels: int | None = None):
        self.params, self.num_labels = params, num_labels

    def __call__(self, image: np.ndarray, label: np.ndarray, labelled: list) -> np.ndarray:
        return crf_refine_labels(image, label, self.params, extra_labels=[c + 1 for c in labelled],
                                 num_labels=self.num_labels)

    @classmethod
    def from_config(cls, sect, num_classes: int) -> "CRFLabelRefiner":
        """The refiner of a ``crf`` section: its constants, and ``unary_labels`` ``all`` (the unary over the C+1
        labels, the reference) or ``image`` (over the image's own labels)."""
        from ..config import ConfigError

        kind = str(sect.get("unary_labels", "image"))
        if kind not in ("all", "image"):
            raise ConfigError(f"crf.unary_labels={kind!r}: expected all or image")
        return cls(CRFParams.from_config(sect), num_classes + 1 if kind == "all" else None)


class CRFScoreRefiner:
    """Per-image refiner of CAM ``.npy`` dicts: scores [(1 - max_c M_c)^alpha; M_c for the labelled c], dense
    CRF (:func:`crf_refine_scores`), argmax -> VOC label map. ``alpha`` is the power background of the PSA
    lineage (PSA la/ha 4 / 32, SEAM 4 / 24)."""

    input_kind = "npy"
    name = "crf"

    def __init__(self, params: CRFParams = CRFParams(), alpha: float = 4.0):
        self.params, self.alpha = params, float(alpha)

    def __call__(self, image: np.ndarray, cams: dict, labelled: list) -> np.ndarray:
        keys = sorted(cams)
        if not keys:
            return np.zeros(image.shape[:2], np.uint8)
        maps = np.stack([cams[k] for k in keys]).astype(np.float32)
        probs = np.concatenate([(1.0 - maps.max(0, keepdims=True)) ** self.alpha, maps])
        q = crf_refine_scores(image, probs, self.params)
        return np.array([0] + [k + 1 for k in keys], np.uint8)[q.argmax(0)]
