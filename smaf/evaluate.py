"""Evaluate folders of predictions against ground-truth masks (``python -m smaf.evaluate``).

Predictions are label PNGs ``<pred>/<id>.png`` (VOC numbering) or CAM ``.npy`` dicts ``<pred>/<id>.npy``
turned into labels with a constant background score (``--bg 0.2``) or each image's Otsu threshold
(``--bg otsu``, :func:`smaf.cam.background_score`). Scores follow :mod:`smaf.metrics`.

``--curve`` sweeps the background threshold t = 0.00, 0.01, ..., 0.60 over ``.npy`` dicts. The best t is
chosen WITH the ground truth, so the number it gives is GT-tuned: report it as such, never as the method's
number (smaf.md, "Evaluation conventions").

Examples::

    python -m smaf.evaluate --pred work/gen_fusion/png --root data/VOC2012 --list dataset/train.txt
    python -m smaf.evaluate --pred work/gen_fusion/npy --gt data/VOC2012/SegmentationClass \
        --list dataset/train.txt --curve
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .cam import BackgroundRule
from .io import atomic_save, cam_dict_to_label, load_cam_dict, load_label_png
from .metrics import confusion_matrix, format_table, scores

#: Background thresholds of ``--curve``: i/100 for i = 0..60 (exact decimal values, not an accumulated arange).
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(61))
DEFAULT_BG = 0.20
GT_TUNED_LABEL = "best background threshold (chosen with ground truth)"

PNG_PRODUCERS = ("label PNGs are written by stage 1 (gen_fusion: seeds), stage 3 (gen_pm: pseudo masks) and "
                 "stage 4 inference")
NPY_PRODUCERS = "CAM .npy dicts are written by stage 1 (gen_fusion) and stage 3 (gen_pm)"


# ----------------------------------------------------------------------------------------------- helpers
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


def _check_values(label: np.ndarray, num_labels: int, path: Path, what: str) -> None:
    """Class-count check: values must be 0..K-1 or 255 (anything else means a wrong labels.txt)."""
    bad = label[(label >= num_labels) & (label != 255)]
    if bad.size:
        raise ValueError(f"class count mismatch: {what} '{path}' holds class value {int(bad.max())} but there are "
                         f"only {num_labels - 1} foreground classes; pass the dataset's labels.txt (--labels)")


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
                    desc: str = "eval", producer: str | None = None, strict: bool = True) -> dict:
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

    Returns:
        The :func:`smaf.metrics.scores` dict (``miou`` in percent, per-class IoU/precision/recall) with
        ``num_images``, plus ``confusion`` (the summed (K, K+1) matrix as nested lists) and ``bg_threshold``.

    Raises:
        FileNotFoundError: a folder, prediction or mask is missing (one line naming the first missing file).
        ValueError: a prediction smaller than its mask, an unreadable file, or a class-count mismatch.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
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
            _check_values(gt, num_labels, gt_path, "mask")
            _check_values(pred, num_labels, pred_path, "prediction")
        try:
            return confusion_matrix(pred, gt, num_labels - 1)
        except ValueError as err:
            raise ValueError(f"{pred_path}: {err} ('{gt_path}'); regenerate the prediction at the original image "
                             f"size") from None

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


def _nice_step(span: float, target: int) -> float:
    """A 1/2/5 x 10^n step giving about ``target`` ticks over ``span``."""
    raw = max(span, 1e-9) / max(target, 1)
    mag = 10 ** np.floor(np.log10(raw))
    for mult in (1, 2, 5, 10):
        if mult * mag >= raw:
            return float(mult * mag)
    return float(10 * mag)


def plot_curve(curve: Sequence[tuple[float, float]], path: str | os.PathLike,
               title: str = "mIoU vs background threshold (best point chosen with ground truth)") -> Path:
    """Draw the curve with OpenCV: axes, labelled ticks, the line and the best point marked; write a PNG
    (atomic) to ``path`` and return it."""
    import cv2

    from .io import save_image

    points = [(float(t), float(m)) for t, m in curve if m is not None]
    if not points:
        raise ValueError("nothing to plot: the curve has no defined mIoU")
    width, height = 900, 540
    left, right, top, bottom = 80, 30, 50, 70
    img = np.full((height, width, 3), 255, np.uint8)
    ts = np.array([p[0] for p in points])
    ms = np.array([p[1] for p in points])
    x0, x1 = float(ts.min()), float(ts.max())
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.05, x1 + 0.05
    y_step = _nice_step(float(ms.max() - ms.min()), 6)
    y0 = np.floor(ms.min() / y_step) * y_step
    y1 = np.ceil(ms.max() / y_step) * y_step
    if y1 - y0 < 1e-9:  # a flat curve still needs a visible y range
        y0, y1 = max(0.0, y0 - y_step), y1 + y_step

    def px(t: float, m: float) -> tuple[int, int]:
        x = left + (t - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (m - y0) / (y1 - y0) * (height - top - bottom)
        return int(round(x)), int(round(y))

    black, grey, blue, red = (0, 0, 0), (220, 220, 220), (31, 119, 180), (214, 39, 40)
    font = cv2.FONT_HERSHEY_SIMPLEX
    # grid and ticks
    x_step = _nice_step(x1 - x0, 8)
    t = np.ceil(x0 / x_step - 1e-9) * x_step
    while t <= x1 + 1e-9:
        x, _ = px(t, y0)
        cv2.line(img, (x, top), (x, height - bottom), grey, 1)
        cv2.line(img, (x, height - bottom), (x, height - bottom + 5), black, 1)
        label = f"{abs(t) if abs(t) < 1e-9 else t:.2f}"  # no "-0.00"
        size = cv2.getTextSize(label, font, 0.45, 1)[0]
        cv2.putText(img, label, (x - size[0] // 2, height - bottom + 20), font, 0.45, black, 1, cv2.LINE_AA)
        t += x_step
    m = y0
    while m <= y1 + 1e-9:
        _, y = px(x0, m)
        cv2.line(img, (left, y), (width - right, y), grey, 1)
        cv2.line(img, (left - 5, y), (left, y), black, 1)
        label = f"{m:g}"
        size = cv2.getTextSize(label, font, 0.45, 1)[0]
        cv2.putText(img, label, (left - 9 - size[0], y + size[1] // 2), font, 0.45, black, 1, cv2.LINE_AA)
        m += y_step
    # axes and labels
    cv2.line(img, (left, top), (left, height - bottom), black, 1)
    cv2.line(img, (left, height - bottom), (width - right, height - bottom), black, 1)
    xlabel = "background threshold t"
    size = cv2.getTextSize(xlabel, font, 0.55, 1)[0]
    cv2.putText(img, xlabel, ((left + width - right - size[0]) // 2, height - 20), font, 0.55, black, 1, cv2.LINE_AA)
    ylabel = np.full((24, 120, 3), 255, np.uint8)
    cv2.putText(ylabel, "mIoU (%)", (4, 17), font, 0.55, black, 1, cv2.LINE_AA)
    ylabel = np.ascontiguousarray(np.rot90(ylabel))
    yy = (top + height - bottom - ylabel.shape[0]) // 2
    img[yy:yy + ylabel.shape[0], 4:4 + ylabel.shape[1]] = ylabel
    cv2.putText(img, title, (left, 30), font, 0.55, black, 1, cv2.LINE_AA)
    # the curve and the best point
    poly = np.array([px(t, m) for t, m in points], np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [poly], False, blue, 2, cv2.LINE_AA)
    bt, bm = best_threshold(points)
    bx, by = px(bt, bm)
    cv2.circle(img, (bx, by), 6, red, 2, cv2.LINE_AA)
    cv2.line(img, (bx, by + 8), (bx, height - bottom), red, 1)
    note = f"best t = {bt:.2f}, mIoU {bm:.2f} (GT-tuned)"
    size = cv2.getTextSize(note, font, 0.5, 1)[0]
    tx = min(max(left + 4, bx - size[0] // 2), width - right - size[0] - 4)
    ty = by - 20 if by - 20 - size[1] > top else by + 30
    cv2.rectangle(img, (tx - 3, ty - size[1] - 4), (tx + size[0] + 3, ty + 5), (255, 255, 255), -1)
    cv2.putText(img, note, (tx, ty), font, 0.5, red, 1, cv2.LINE_AA)
    return save_image(path, img)


# -------------------------------------------------------------------------------------------------- CLI
def _detect_format(pred_dir: Path, bg: float | None, curve: bool) -> str:
    """'png' or 'npy' for a prediction folder (explicit --bg or --curve mean npy)."""
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder '{pred_dir}' not found: check --pred ({PNG_PRODUCERS}; "
                                f"{NPY_PRODUCERS})")
    if bg is not None or curve:
        with os.scandir(pred_dir) as entries:
            if not any(entry.name.endswith(".npy") for entry in entries):
                flag = "--curve" if curve else "--bg"
                raise FileNotFoundError(f"{flag} needs CAM .npy dicts but prediction folder '{pred_dir}' has none "
                                        f"({NPY_PRODUCERS}); drop {flag} to evaluate label PNGs")
        return "npy"
    has_npy = False
    with os.scandir(pred_dir) as entries:
        for entry in entries:
            if entry.name.endswith(".png"):
                return "png"
            has_npy = has_npy or entry.name.endswith(".npy")
    if has_npy:
        return "npy"
    raise FileNotFoundError(f"prediction folder '{pred_dir}' holds no .png label maps and no .npy CAM dicts; "
                            f"check --pred")


def _class_names(args, gt_dir: Path) -> tuple[list[str], str]:
    from .data.voc import load_class_names

    if args.labels:
        path = Path(args.labels)
        if not path.is_file():
            raise FileNotFoundError(f"class names file '{path}' not found: fix --labels")
        return ["background"] + load_class_names(path), str(path)
    for candidate in (gt_dir / "labels.txt", gt_dir.parent / "labels.txt"):
        if candidate.is_file():
            return ["background"] + load_class_names(candidate), str(candidate)
    return ["background"] + load_class_names(None), "the 20 VOC classes (no labels.txt found; use --labels)"


def _bg_argument(text: str):
    """--bg value: a float, or 'otsu'."""
    if text.strip().lower() == "otsu":
        return "otsu"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'otsu', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smaf.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="folder of <id>.png label maps or <id>.npy CAM dicts")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gt", help="folder of ground-truth <id>.png masks")
    src.add_argument("--root", help="VOC-layout root: masks from SegmentationClassAug/ or SegmentationClass/, "
                                    "class names from its labels.txt")
    p.add_argument("--list", help="split list (bare ids or '/JPEGImages/x.jpg /SegmentationClassAug/x.png' lines); "
                                  "default: every mask of the ground-truth folder")
    p.add_argument("--labels", help="labels.txt with the class names (default: beside the masks, else VOC's 20)")
    p.add_argument("--bg", type=_bg_argument, default=None,
                   help=f"background score for .npy CAM dicts: a number (default {DEFAULT_BG}) or 'otsu' (each "
                        f"image's Otsu threshold, fallback {DEFAULT_BG}); implies .npy input. Without it, a folder "
                        f"with .png files is evaluated as label maps, otherwise as .npy")
    p.add_argument("--curve", action="store_true",
                   help="sweep the background threshold 0.00..0.60 over .npy dicts (GT-tuned), write curve.csv "
                        "and curve.png")
    p.add_argument("--out", help="output folder of the JSON report (default: <pred>/../eval)")
    p.add_argument("--name", help="report name (default: <pred folder name>[_<list name>])")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: all cores)")
    return p


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from .data.voc import VOCLayout, read_id_list

    pred_dir = Path(args.pred)
    if args.root:
        if not Path(args.root).is_dir():
            raise FileNotFoundError(f"dataset root '{args.root}' not found: fix --root (or give the masks with --gt)")
        layout = VOCLayout(args.root, labels_txt=args.labels or "")
        if layout.mask_dir is None:
            raise FileNotFoundError(f"dataset root '{layout.root}' has no SegmentationClassAug/ or "
                                    f"SegmentationClass/ folder: evaluation needs ground-truth masks (or use --gt)")
        gt_dir = layout.mask_dir
        class_names = ["background"] + list(layout.class_names)
        names_from = args.labels or (str(layout.root / "labels.txt") if (layout.root / "labels.txt").is_file()
                                     else "the 20 VOC classes (no labels.txt in the root)")
    else:
        gt_dir = Path(args.gt)
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"ground-truth folder '{gt_dir}' not found: fix --gt")
        class_names, names_from = _class_names(args, gt_dir)
    fmt = _detect_format(pred_dir, args.bg, args.curve)
    if args.list:
        ids = read_id_list(args.list)
        id_source = f"list '{args.list}'"
    else:
        ids = sorted(p.stem for p in gt_dir.glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"ground-truth folder '{gt_dir}' holds no .png masks")
        id_source = f"all masks of '{gt_dir}' (no --list)"
    out_dir = Path(args.out) if args.out else pred_dir.resolve().parent / "eval"
    name = args.name or (pred_dir.resolve().name + (f"_{Path(args.list).stem}" if args.list else ""))
    print(f"evaluating {len(ids)} ids from {id_source}; {len(class_names)} classes from {names_from}; "
          f"predictions: {fmt} in '{pred_dir}'")

    if args.curve:
        if args.bg == "otsu":
            raise ValueError("--curve sweeps constant background scores: give --bg a number (or leave it out)")
        bg = DEFAULT_BG if args.bg is None else args.bg
        grid = list(DEFAULT_THRESHOLDS)
        thr, confs = sweep_confusions(pred_dir, gt_dir, ids, class_names, grid + [bg], workers=args.workers)
        on_grid = {round(t, 6) for t in grid}
        curve = [(float(t), scores(c, class_names)["miou"]) for t, c in zip(thr, confs) if round(t, 6) in on_grid]
        at_bg = scores(confs[int(np.argmin(np.abs(thr - bg)))], class_names, num_images=len(ids))
        at_bg["bg_threshold"] = bg
        best_t, best_miou = best_threshold(curve)
        at_best = scores(confs[int(np.argmin(np.abs(thr - best_t)))], class_names, num_images=len(ids))
        print("background threshold sweep (t: mIoU):")
        cells = [f"{t:.2f}: {'-' if m is None else f'{m:5.2f}'}" for t, m in curve]
        for start in range(0, len(cells), 8):
            print("  " + "   ".join(cells[start:start + 8]))
        print(format_table(at_bg, title=f"CAM .npy at the fixed background threshold {bg:.2f}"))
        print(f"{GT_TUNED_LABEL}: {best_t:.2f} -> mIoU {best_miou:.2f}")
        csv_path = write_curve_csv(curve, out_dir / "curve.csv")
        png_path = plot_curve(curve, out_dir / "curve.png")
        report = dict(at_bg)
        report.update({"curve": [[t, m] for t, m in curve], "best_threshold": best_t, "best_miou": best_miou,
                       "best_threshold_note": "chosen with ground truth (GT-tuned); not the method's number",
                       "best_iou": at_best["iou"], "ids": id_source, "pred_dir": str(pred_dir),
                       "gt_dir": str(gt_dir)})
        json_path = write_report(report, out_dir, name)
        print(f"wrote {json_path}, {csv_path}, {png_path}")
        return 0

    bg = None if fmt == "png" else (DEFAULT_BG if args.bg is None else args.bg)
    if bg == "otsu":
        bg = BackgroundRule("otsu", DEFAULT_BG)
    result = evaluate_folder(pred_dir, gt_dir, ids, class_names, bg_threshold=bg, workers=args.workers)
    result.update({"ids": id_source, "pred_dir": str(pred_dir), "gt_dir": str(gt_dir)})
    title = f"{pred_dir} ({fmt}" + (f", background {bg})" if isinstance(bg, BackgroundRule) else
                                    f", background threshold {bg:.2f})" if bg is not None else ")")
    print(format_table(result, title=title))
    print(f"wrote {write_report(result, out_dir, name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; expected user errors print one ``error: ...`` line and return 2."""
    from .data.voc import DatasetError

    try:
        return _main(argv)
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
