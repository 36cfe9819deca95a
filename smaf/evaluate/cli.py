"""Command line: evaluate folders of predictions against ground-truth masks (``python -m smaf.evaluate``).

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
import os
import sys
from pathlib import Path

import numpy as np

from ..cam.background import BackgroundRule
from ..metrics import format_table, scores
from ..runtime import EXIT_EXPECTED_ERROR, SmafError, one_line
from .folder import (DEFAULT_BG, DEFAULT_THRESHOLDS, GT_TUNED_LABEL, NPY_PRODUCERS, PNG_PRODUCERS, best_threshold,
                     evaluate_folder, sweep_confusions, write_curve_csv, write_report)
from .plot import plot_curve


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
    from ..data.voc import load_class_names

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
    from ..data.voc import VOCLayout, read_id_list

    pred_dir = Path(args.pred)
    if args.root:
        if not Path(args.root).is_dir():
            raise FileNotFoundError(f"dataset root '{args.root}' not found: fix --root (or give the masks with --gt)")
        layout = VOCLayout(args.root, labels_txt=args.labels or "")
        if layout.mask_dir is None:
            raise FileNotFoundError(f"dataset root '{layout.root}' has no SegmentationClassAug/ or "
                                    f"SegmentationClass/ folder: evaluation needs ground-truth masks (or use --gt)")
        gt_dir = layout.mask_dir
        image_dir = layout.image_dir
        class_names = ["background"] + list(layout.class_names)
        names_from = args.labels or (str(layout.root / "labels.txt") if (layout.root / "labels.txt").is_file()
                                     else "the 20 VOC classes (no labels.txt in the root)")
    else:
        gt_dir = Path(args.gt)
        image_dir = None
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
        # an off-grid --bg is swept too, unless it equals a grid point in float32 (the precision thresholds are
        # compared in): that point's matrix is then bg's. The curve holds the grid points only, exactly.
        same_as_grid = bool((np.asarray(grid, np.float32) == np.float32(bg)).any())
        thr, confs = sweep_confusions(pred_dir, gt_dir, ids, class_names, grid + ([] if same_as_grid else [bg]),
                                      workers=args.workers)
        on_grid = set(grid)
        curve = [(float(t), scores(c, class_names)["miou"]) for t, c in zip(thr, confs) if float(t) in on_grid]
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
    result = evaluate_folder(pred_dir, gt_dir, ids, class_names, bg_threshold=bg, workers=args.workers,
                             image_dir=image_dir)
    result.update({"ids": id_source, "pred_dir": str(pred_dir), "gt_dir": str(gt_dir)})
    title = f"{pred_dir} ({fmt}" + (f", background {bg})" if isinstance(bg, BackgroundRule) else
                                    f", background threshold {bg:.2f})" if bg is not None else ")")
    print(format_table(result, title=title))
    print(f"wrote {write_report(result, out_dir, name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; expected user errors print one ``error: ...`` line and return
    :data:`smaf.runtime.EXIT_EXPECTED_ERROR`."""
    try:
        return _main(argv)
    except (SmafError, ValueError, FileNotFoundError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_EXPECTED_ERROR
