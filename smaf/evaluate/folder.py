"""Scoring folders of predictions against ground-truth masks (the library behind ``python -m smaf.evaluate``).

Predictions are label PNGs ``<pred>/<id>.png`` (VOC numbering) or CAM ``.npy`` dicts ``<pred>/<id>.npy``
turned into labels with a constant background score or a per-image :class:`~smaf.cam.background.BackgroundRule`.
Scores follow :mod:`smaf.metrics`. :func:`sweep_confusions` / :func:`threshold_curve` sweep a constant
background score over ``.npy`` dicts: the best value is chosen WITH the ground truth (GT-tuned).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..cam.background import BackgroundRule
from ..io import atomic_save, cam_dict_to_label, load_cam_dict, load_label_png
from ..metrics import confusion_matrix, scores

#: Background thresholds of ``--curve``: i/100 for i = 0..60 (exact decimal values, not an accumulated arange).
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(61))
DEFAULT_BG = 0.20
GT_TUNED_LABEL = "best background threshold (chosen with ground truth)"

PNG_PRODUCERS = ("label PNGs are written by stage 1 (gen_fusion: seeds), stage 3 (gen_pm: pseudo masks) and "
                 "stage 4 inference")
NPY_PRODUCERS = "CAM .npy dicts are written by stage 1 (gen_fusion) and stage 3 (gen_pm)"


# ----------------------------------------------------------------------------------------------- helpers
def _check_dirs(pred_dir: Path, gt_dir: Path, producer: str) -> None:
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder '{gt_dir}' not found: give the folder of <id>.png masks "
                                f"(SegmentationClass or SegmentationClassAug)")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder '{pred_dir}' not found: {producer}; run that stage or fix --pred")


def _check_files(pred_dir: Path, gt_dir: Path, ids: Sequence[str], suffix: str, producer: str) -> None:
    """Fail before any decoding when a prediction or mask file is missing (one line, first file named)."""
    if not ids:
        raise ValueError("no image ids to evaluate: the id list is empty")
    missing = [i for i in ids if not (pred_dir / f"{i}{suffix}").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(ids)} ids)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"prediction '{pred_dir / (missing[0] + suffix)}' not found{more}: {producer}; "
                                f"run that stage on this id list, or evaluate the list it was run on (--list)")
    missing = [i for i in ids if not (gt_dir / f"{i}.png").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(ids)} ids)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"ground-truth mask '{gt_dir / (missing[0] + '.png')}' not found{more}: the id list "
                                f"names images without masks; use a list of annotated images")


LABELS_HINT = "pass the dataset's labels.txt (--labels)"


def _check_values(label: np.ndarray, num_labels: int, path: Path, what: str, hint: str = LABELS_HINT) -> None:
    """Class-count check: values must be 0..K-1 or 255 (anything else means a wrong labels.txt)."""
    bad = label[(label >= num_labels) & (label != 255)]
    if bad.size:
        raise ValueError(f"class count mismatch: {what} '{path}' holds class value {int(bad.max())} but there are "
                         f"only {num_labels - 1} foreground classes; {hint}")


def _image_size(image_dir: Path | None, image_id: str) -> tuple[tuple[int, int], Path] | None:
    """((H, W), path) of ``<image_dir>/<id>.<ext>`` from its header, or None."""
    if image_dir is None:
        return None
    from PIL import Image

    from ..data.voc import IMAGE_SUFFIXES

    for suffix in IMAGE_SUFFIXES:
        path = image_dir / f"{image_id}{suffix}"
        if path.is_file():
            try:
                with Image.open(path) as img:
                    return (img.size[1], img.size[0]), path
            except (OSError, SyntaxError, ValueError):
                return None
    return None


def _size_error(pred_path: Path, gt_path: Path, pred_shape, gt_shape, image_dir: Path | None, image_id: str,
                err: Exception) -> ValueError:
    """The error for a prediction smaller than its mask: when the image has the prediction's size, the mask
    does not fit its image (the prediction is not at fault)."""
    found = _image_size(image_dir, image_id)
    if found is not None and tuple(found[0]) != tuple(gt_shape):
        (h, w), image_path = found
        return ValueError(f"mask '{gt_path}' is {gt_shape[0]}x{gt_shape[1]} (HxW) but its image '{image_path}' is "
                          f"{h}x{w}: a mask must have its image's size; fix the mask or the image "
                          f"(`python -m smaf.data.prepare --root <root>` lists every such mask)")
    return ValueError(f"{pred_path}: {err} ('{gt_path}'); regenerate the prediction at the original image size")


def _run_parallel(fn: Callable[[str], np.ndarray], ids: Sequence[str], workers: int | None, desc: str) -> np.ndarray:
    """Sum ``fn(id)`` over ``ids`` with a thread pool (PIL decoding and NumPy release the GIL).

    The first exception stops the remaining work and is re-raised."""
    workers = max(1, int(workers or os.cpu_count() or 1))
    total = None
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(ids), desc=desc, disable=None, unit="img", leave=False) as bar:
            for part in pool.map(fn, ids):
                total = part if total is None else total + part
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return total


# --------------------------------------------------------------------------------------- evaluation
def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, ids: Sequence[str],
                    class_names: Sequence[str], bg_threshold=None, workers: int | None = None,
                    desc: str = "eval", producer: str | None = None, strict: bool = True,
                    labels_hint: str = LABELS_HINT, image_dir: str | os.PathLike | None = None) -> dict:
    """Score a folder of predictions against a folder of ground-truth masks.

    Args:
        pred_dir: folder of ``<id>.png`` label maps, or of ``<id>.npy`` CAM dicts when ``bg_threshold`` is set.
        gt_dir: folder of ``<id>.png`` ground-truth masks (VOC numbering, 255 ignored).
        ids: image ids to evaluate.
        class_names: ``["background"] + foreground names`` (K names); K fixes the class count.
        bg_threshold: None for PNG input; else, for ``.npy`` CAM dicts, the constant background score (float) or
            a :class:`smaf.cam.BackgroundRule` (e.g. per-image Otsu).
        workers: loader threads (default ``os.cpu_count()``).
        desc: progress-bar label.
        producer: what produces the predictions, for the missing-file message (a stage name); a generic
            description of the stages is used when None.
        strict: raise when a mask or prediction holds a value in K..254 (a class-count mismatch). With False,
            such GT pixels are ignored and such predictions count as unassigned (see :mod:`smaf.metrics`).
        labels_hint: the fix the class-count message gives (the CLI's ``--labels``; a stage's data.labels_txt).
        image_dir: the images' folder, when known: a prediction smaller than its mask is then blamed on the
            mask when the image has the prediction's size (a mask of another image).

    Returns:
        The :func:`smaf.metrics.scores` dict (``miou`` in percent, per-class IoU/precision/recall) with
        ``num_images``, plus ``confusion`` (the summed (K, K+1) matrix as nested lists) and ``bg_threshold``.

    Raises:
        FileNotFoundError: a folder, prediction or mask is missing (one line naming the first missing file).
        ValueError: a prediction smaller than its mask, an unreadable file, or a class-count mismatch.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    image_dir = Path(image_dir) if image_dir else None
    num_labels = len(class_names)
    is_rule = isinstance(bg_threshold, BackgroundRule)
    suffix = ".png" if bg_threshold is None else ".npy"
    producer = producer or (PNG_PRODUCERS if bg_threshold is None else NPY_PRODUCERS)
    _check_dirs(pred_dir, gt_dir, producer)
    ids = list(ids)
    _check_files(pred_dir, gt_dir, ids, suffix, producer)

    def one(image_id: str) -> np.ndarray:
        gt_path = gt_dir / f"{image_id}.png"
        pred_path = pred_dir / f"{image_id}{suffix}"
        gt = load_label_png(gt_path)
        if bg_threshold is None:
            pred = load_label_png(pred_path)
        else:
            cams = load_cam_dict(pred_path)
            _check_cam_keys(cams, num_labels - 1, pred_path)
            score = bg_threshold.score_cam_dict(cams) if is_rule else bg_threshold
            pred = cam_dict_to_label(cams, score, size=gt.shape)
        if strict:
            _check_values(gt, num_labels, gt_path, "mask", labels_hint)
            _check_values(pred, num_labels, pred_path, "prediction", labels_hint)
        try:
            return confusion_matrix(pred, gt, num_labels - 1)
        except ValueError as err:
            raise _size_error(pred_path, gt_path, pred.shape, gt.shape, image_dir, image_id, err) from None

    conf = _run_parallel(one, ids, workers, desc)
    result = scores(conf, class_names, num_images=len(ids))
    result["bg_threshold"] = bg_threshold.report_value if is_rule else bg_threshold
    result["confusion"] = conf.tolist()
    return result


def _check_cam_keys(cams: dict, num_classes: int, path: Path) -> None:
    bad = [k for k in cams if not 0 <= k < num_classes]
    if bad:
        raise ValueError(f"class count mismatch: CAM dict '{path}' has class index {max(bad)} but there are only "
                         f"{num_classes} foreground classes (indices 0..{num_classes - 1}); pass the dataset's "
                         f"labels.txt (--labels)")


def _fg_max_and_label(cams: dict, size: tuple[int, int], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the largest foreground score (float32, -inf without classes) and its VOC label (uint8), both
    cropped to ``size``. For any t, ``cam_dict_to_label(cams, t)`` equals ``where(max > float32(t), label, 0)``
    because ``argmax`` breaks ties towards the background channel, which comes first."""
    h, w = size
    if not cams:
        return np.full(size, -np.inf, dtype=np.float32), np.zeros(size, dtype=np.uint8)
    keys = sorted(cams)
    stack = np.stack([cams[k] for k in keys]).astype(np.float32, copy=False)
    if stack.shape[1] < h or stack.shape[2] < w:
        raise ValueError(f"{path}: CAM maps are {stack.shape[1]}x{stack.shape[2]} (HxW) but the ground truth is "
                         f"{h}x{w}; regenerate the CAMs at the original image size")
    stack = stack[:, :h, :w]
    best = np.argmax(stack, 0)
    fg_max = np.take_along_axis(stack, best[None], 0)[0]
    lut = np.array([k + 1 for k in keys], dtype=np.uint8)
    return fg_max, lut[best]


def sweep_confusions(npy_dir: str | os.PathLike, gt_dir: str | os.PathLike, ids: Sequence[str],
                     class_names: Sequence[str], thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                     workers: int | None = None, desc: str = "curve", producer: str | None = None) -> tuple:
    """Confusion matrices of CAM dicts for many background thresholds, loading every file once.

    Each valid pixel with best foreground score m and label l is predicted l when m > t and background
    otherwise. With the thresholds sorted, a pixel is foreground exactly for the first
    ``k = searchsorted(thresholds, m)`` of them, so one ``bincount`` over (k, gt, l) per image and cumulative
    sums over k give all the matrices. Thresholds are compared in float32, exactly as
    :func:`smaf.io.cam_dict_to_label` does.

    Args:
        npy_dir: folder of ``<id>.npy`` CAM dicts; gt_dir: folder of ``<id>.png`` masks; ids: image ids;
        class_names: K names (background first); thresholds: background scores (any order, distinct).

    Returns:
        ``(thresholds, confs)``: float64 (T,) ascending, and int64 (T, K, K+1) confusion matrices (the
        unassigned column is always zero here: CAM labels are always valid classes).
    """
    npy_dir, gt_dir = Path(npy_dir), Path(gt_dir)
    producer = producer or NPY_PRODUCERS
    k = len(class_names)
    thr = np.unique(np.asarray(list(thresholds), dtype=np.float64))
    if thr.size == 0:
        raise ValueError("no background thresholds to sweep")
    thr32 = thr.astype(np.float32)
    if np.unique(thr32).size != thr32.size:
        raise ValueError("background thresholds must differ in float32")
    n_thr = thr.size
    _check_dirs(npy_dir, gt_dir, producer)
    ids = list(ids)
    _check_files(npy_dir, gt_dir, ids, ".npy", producer)

    def one(image_id: str) -> np.ndarray:
        gt_path = gt_dir / f"{image_id}.png"
        npy_path = npy_dir / f"{image_id}.npy"
        gt = load_label_png(gt_path)
        _check_values(gt, k, gt_path, "mask")
        cams = load_cam_dict(npy_path)
        _check_cam_keys(cams, k - 1, npy_path)
        fg_max, fg_label = _fg_max_and_label(cams, gt.shape, npy_path)
        g = gt.reshape(-1)
        valid = g < k
        g = g[valid].astype(np.int64)
        m = fg_max.reshape(-1)[valid]
        lab = fg_label.reshape(-1)[valid].astype(np.int64)
        # number of thresholds strictly below m = how many thresholds predict the foreground label
        n_fg = np.searchsorted(thr32, m, side="left").astype(np.int64)
        counts = np.bincount((n_fg * k + g) * k + lab, minlength=(n_thr + 1) * k * k)
        return counts.reshape(n_thr + 1, k, k)

    counts = _run_parallel(one, ids, workers, desc)  # (T+1, K, K): pixels by (n_fg, gt, fg label)
    # threshold i predicts the fg label for pixels with n_fg > i, background for n_fg <= i
    fg_part = np.cumsum(counts[::-1], 0)[::-1][1:]            # sum over n_fg > i, (T, K, K)
    bg_part = np.cumsum(counts.sum(2), 0)[:n_thr]             # sum over n_fg <= i, (T, K)
    confs = np.zeros((n_thr, k, k + 1), dtype=np.int64)
    confs[:, :, :k] = fg_part
    confs[:, :, 0] += bg_part
    return thr, confs


def threshold_curve(npy_dir: str | os.PathLike, gt_dir: str | os.PathLike, ids: Sequence[str],
                    class_names: Sequence[str], thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                    workers: int | None = None, desc: str = "curve") -> list[tuple[float, float]]:
    """mIoU of CAM dicts for each background threshold (each file loaded once, see :func:`sweep_confusions`).

    Returns ``[(t, miou_percent), ...]`` in ascending t (default t = 0.00, 0.01, ..., 0.60). The best t of
    this curve is chosen with ground truth: a GT-tuned figure."""
    thr, confs = sweep_confusions(npy_dir, gt_dir, ids, class_names, thresholds, workers=workers, desc=desc)
    return [(float(t), scores(c, class_names)["miou"]) for t, c in zip(thr, confs)]


def best_threshold(curve: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(t, miou)`` with the highest mIoU; ties go to the smallest t."""
    best = None
    for t, miou in curve:
        if miou is not None and (best is None or miou > best[1]):
            best = (t, miou)
    if best is None:
        raise ValueError("the curve has no defined mIoU (no scored pixels)")
    return best


# ------------------------------------------------------------------------------------------ outputs
def write_report(result: dict, out_dir: str | os.PathLike, name: str) -> Path:
    """Write ``result`` as ``<out_dir>/<name>.json`` (indent 2, atomic) and return the path."""
    path = Path(out_dir) / f"{name}.json"
    text = json.dumps(result, indent=2)

    def write(tmp):
        Path(tmp).write_text(text + "\n")

    return atomic_save(path, write)


def write_curve_csv(curve: Sequence[tuple[float, float]], path: str | os.PathLike) -> Path:
    """Write ``threshold,miou`` rows (header first) to ``path`` (atomic) and return it."""
    lines = ["threshold,miou"] + [f"{t:.4f},{'' if m is None else f'{m:.4f}'}" for t, m in curve]

    def write(tmp):
        Path(tmp).write_text("\n".join(lines) + "\n")

    return atomic_save(path, write)
