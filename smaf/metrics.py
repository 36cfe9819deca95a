"""Segmentation metrics: confusion matrices, per-class IoU / precision / recall, mIoU and a text table.

Pure NumPy, no file IO (see :mod:`smaf.evaluate` for folders of predictions).

Conventions (related-methods.md section 1.6, smaf.md "Evaluation conventions"):

* Labels use VOC numbering: 0 = background, c+1 = foreground class c, 255 = ignore. With C foreground
  classes there are K = C + 1 scored classes.
* Ground-truth pixels equal to 255, or to any value >= K, are ignored (they count nowhere).
* The prediction is cropped to the ground-truth size (``pred[:H, :W]``); a prediction smaller than its
  ground truth is an error, never silently padded.
* A prediction value outside 0..K-1 (for instance 255 "ignore" in a pseudo mask) is "no class": the pixel is
  a false negative for its ground-truth class and a false positive for no class. Such pixels are kept in an
  extra last column of the confusion matrix (column K, "unassigned"), so the matrix is (K, K+1): rows are
  ground truth 0..K-1, columns are predictions 0..K-1 plus "unassigned". Dropping them instead (the EPS
  convention) would reward a method for abstaining on hard pixels.
* IoU_k = TP/(TP+FP+FN) summed over all images of the split (not averaged per image), defined only where
  TP+FP+FN > 0; mIoU is the mean over the defined classes (the ``nanmean`` convention).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts of (ground truth, prediction) pairs for one image.

    Args:
        pred: integer (Hp, Wp) predicted label map in VOC numbering, with Hp >= H and Wp >= W; it is cropped
            to ``pred[:H, :W]``. Values outside 0..K-1 (e.g. 255) are "unassigned" (see below).
        gt: integer (H, W) ground-truth label map; 255 and values >= K are ignored.
        num_classes: C, the number of foreground classes; K = C + 1.

    Returns:
        int64 array (K, K+1): ``conf[g, p]`` = number of pixels with ground truth g and prediction p for
        p in 0..K-1; ``conf[g, K]`` = pixels of ground truth g whose prediction is outside 0..K-1. Such a pixel
        is a false negative for g and a false positive for no class. ``conf[:, :K]`` is the usual square
        confusion matrix; row sums (over all K+1 columns) are the ground-truth pixel counts per class.

    Raises:
        ValueError: the inputs are not 2-D, or the prediction is smaller than the ground truth in either
            dimension (the message gives both sizes; callers add the file names).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"label maps must be 2-D, got prediction {pred.shape} and ground truth {gt.shape}")
    k = int(num_classes) + 1
    h, w = gt.shape
    if pred.shape[0] < h or pred.shape[1] < w:
        raise ValueError(f"prediction is {pred.shape[0]}x{pred.shape[1]} (HxW) but the ground truth is {h}x{w}; "
                         f"a prediction must cover the whole ground truth")
    gt_rows, pred_cols = _row_index(gt, k), _column_index(pred[:h, :w], k)
    # Flat bin = row * (K+1) + column; ignored ground truth lands in an extra row k, dropped below.
    flat = gt_rows * np.asarray(k + 1, dtype=gt_rows.dtype) + pred_cols
    counts = np.bincount(flat.reshape(-1), minlength=(k + 1) * (k + 1))
    return counts.reshape(k + 1, k + 1)[:k].astype(np.int64, copy=False)


def _index_dtype(k: int):
    return np.uint16 if (k + 1) * (k + 1) <= np.iinfo(np.uint16).max else np.int64


def _row_index(gt: np.ndarray, k: int) -> np.ndarray:
    """Ground truth -> row 0..K-1, or K for ignored pixels (255, negative or >= K)."""
    dtype = _index_dtype(k)
    if gt.dtype == np.uint8:  # lookup table: the common case (PNG masks), about twice as fast
        return np.minimum(np.arange(256), k).astype(dtype)[gt]
    return np.where((gt >= 0) & (gt < k), gt, k).astype(dtype)


def _column_index(pred: np.ndarray, k: int) -> np.ndarray:
    """Prediction -> column 0..K-1, or K ("unassigned") for values outside 0..K-1."""
    return _row_index(pred, k)


def _as_full(conf: np.ndarray) -> np.ndarray:
    """Accept (K, K) or (K, K+1) and return (K, K+1) int64 (a zero "unassigned" column when absent)."""
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[1] not in (conf.shape[0], conf.shape[0] + 1):
        raise ValueError(f"confusion matrix must be (K, K) or (K, K+1), got {conf.shape}")
    if conf.shape[1] == conf.shape[0]:
        conf = np.concatenate([conf, np.zeros((conf.shape[0], 1), dtype=conf.dtype)], 1)
    return conf.astype(np.int64, copy=False)


def _percent(num: int, den: int) -> float | None:
    return None if den <= 0 else 100.0 * num / den


def scores(conf: np.ndarray, class_names: Sequence[str], num_images: int | None = None) -> dict:
    """Per-class and mean scores from a confusion matrix summed over a split.

    Args:
        conf: int (K, K+1) from :func:`confusion_matrix` (summed over images), or a square (K, K) matrix.
        class_names: K names, ``["background"] + foreground names``.
        num_images: number of images summed into ``conf``, recorded when given.

    Returns:
        A JSON-serialisable dict:
        ``miou`` (percent, mean IoU over the classes where it is defined, None if no class is defined),
        ``pixel_accuracy`` (percent of valid ground-truth pixels predicted correctly; unassigned ones count as
        wrong), ``num_pixels`` (valid ground-truth pixels), ``unassigned_pixels``, ``num_scored_classes``,
        ``num_images`` (when given), ``iou`` ({name: percent or None}), and ``classes``: a list of K dicts
        ``{name, iou, precision, recall, tp, fp, fn, gt_pixels, pred_pixels}`` where IoU = TP/(TP+FP+FN),
        precision = TP/(TP+FP), recall = TP/(TP+FN), all in percent and None where the denominator is 0.

    Raises:
        ValueError: ``len(class_names)`` differs from the K of ``conf``.
    """
    full = _as_full(conf)
    k = full.shape[0]
    names = list(class_names)
    if len(names) != k:
        raise ValueError(f"class count mismatch: the confusion matrix has {k} classes (background included) but "
                         f"{len(names)} class names were given")
    square = full[:, :k]
    tp = np.diag(square)
    gt_pixels = full.sum(1)
    pred_pixels = square.sum(0)
    fp = pred_pixels - tp
    fn = gt_pixels - tp
    classes, defined = [], []
    for i, name in enumerate(names):
        union = int(tp[i] + fp[i] + fn[i])
        iou = None if union == 0 else 100.0 * int(tp[i]) / union
        if iou is not None:
            defined.append(int(tp[i]) / union)
        classes.append({"name": name, "iou": iou, "precision": _percent(int(tp[i]), int(pred_pixels[i])),
                        "recall": _percent(int(tp[i]), int(gt_pixels[i])), "tp": int(tp[i]), "fp": int(fp[i]),
                        "fn": int(fn[i]), "gt_pixels": int(gt_pixels[i]), "pred_pixels": int(pred_pixels[i])})
    total = int(full.sum())
    result = {
        "miou": 100.0 * float(np.mean(defined)) if defined else None,
        "pixel_accuracy": _percent(int(tp.sum()), total),
        "num_pixels": total,
        "unassigned_pixels": int(full[:, k].sum()),
        "num_scored_classes": len(defined),
        "iou": {c["name"]: c["iou"] for c in classes},
        "classes": classes,
    }
    if num_images is not None:
        result["num_images"] = int(num_images)
    return result


def _fmt(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.2f}"


def format_table(result: dict, title: str | None = None) -> str:
    """A fixed-width text table of a :func:`scores` dict: one row per class (IoU, precision, recall in
    percent, '-' where undefined), then mIoU and pixel accuracy lines. Returns the table as one string."""
    rows = result["classes"]
    width = max([len("class")] + [len(r["name"]) for r in rows])
    lines = []
    if title:
        lines.append(title)
    header = f"{'class':<{width}}  {'IoU':>7}  {'prec.':>7}  {'recall':>7}"
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {_fmt(r['iou'])}  {_fmt(r['precision'])}  {_fmt(r['recall'])}")
    lines.append("-" * len(header))
    scored = result.get("num_scored_classes", sum(r["iou"] is not None for r in rows))
    lines.append(f"{'mIoU':<{width}}  {_fmt(result['miou'])}   (mean over {scored} of {len(rows)} classes)")
    lines.append(f"{'pixel acc.':<{width}}  {_fmt(result['pixel_accuracy'])}")
    extra = []
    if result.get("num_images") is not None:
        extra.append(f"{result['num_images']} images")
    if result.get("num_pixels") is not None:
        extra.append(f"{result['num_pixels']} scored pixels")
    if result.get("unassigned_pixels"):
        extra.append(f"{result['unassigned_pixels']} with a prediction outside 0..{len(rows) - 1} (counted wrong)")
    if extra:
        lines.append(", ".join(extra))
    return "\n".join(lines)
