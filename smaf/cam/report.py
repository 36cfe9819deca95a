"""Reports of a stage's output folder: mIoU of its PNGs against the ground truth, and the spread of the
per-image background scores its PNGs were made with."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import dist
from ..evaluate.folder import evaluate_folder, write_report
from ..io import load_cam_dict
from ..metrics import format_table
from ..run_layout import CAM_NPY, EVAL
from .background import BackgroundRule


def background_score_stats(npy_dir: Path, ids: list, bg_rule: BackgroundRule) -> dict:
    """The background scores ``bg_rule`` gives the saved fused maps ``<npy_dir>/<id>.npy`` of ``ids`` (the
    scores their PNGs were made with): ``{method, median, p10, p90, fallback_images}``."""
    # Recomputed from the saved maps rather than collected during generation: images finished in an earlier,
    # interrupted run are covered too (Otsu is deterministic, so these are the scores the PNGs used).
    scores, fallback = [], 0
    for image_id in ids:
        score = bg_rule.score_cam_dict(load_cam_dict(npy_dir / f"{image_id}.npy"))
        scores.append(score)
        fallback += int(bg_rule.method != "fixed" and score == bg_rule.threshold)
    p10, median, p90 = (float(v) for v in np.percentile(scores, [10, 50, 90])) if scores else (None,) * 3
    return {"method": bg_rule.method, "fallback": bg_rule.threshold, "median": median, "p10": p10, "p90": p90,
            "fallback_images": fallback}


def evaluate_outputs(layout, out_dir: Path, subfolder: str, eval_ids: list, logger, done_ids: set,
                     name: str | None = None, bg_rule: BackgroundRule | None = None) -> dict | None:
    """mIoU of ``<out_dir>/<subfolder>/*.png`` on ``eval_ids`` when masks exist and every id was produced.
    With a per-image ``bg_rule``, the report also gives the spread of the background scores used
    (``bg_scores``, see :func:`background_score_stats`)."""

    if not layout.has_masks(eval_ids):
        logger.info("no ground-truth masks for the evaluation list: evaluation skipped")
        return None
    missing = [i for i in eval_ids if i not in done_ids]
    if missing:
        logger.info("evaluation skipped: %d ids of the evaluation list were not generated (e.g. %s)",
                    len(missing), missing[0])
        return None
    names = layout.names_path if layout.names_path.is_file() else "the 20 VOC defaults"
    result = evaluate_folder(out_dir / subfolder, layout.mask_dir, eval_ids,
                             ["background"] + layout.class_names, desc=f"eval {subfolder}",
                             labels_hint=f"set data.labels_txt to the dataset's labels.txt (now: {names})",
                             image_dir=layout.image_dir)
    if bg_rule is not None:
        result["bg_threshold"] = bg_rule.report_value
        if bg_rule.method != "fixed":
            stats = background_score_stats(out_dir / CAM_NPY, eval_ids, bg_rule)
            result["bg_scores"] = stats
            logger.info("background scores (%s): median %.3f, 10-90%% %.3f-%.3f, %d images at the fallback",
                        bg_rule, stats["median"], stats["p10"], stats["p90"], stats["fallback_images"])
    write_report(result, out_dir / EVAL, name or subfolder)
    logger.info("%s", format_table(result, title=f"{out_dir.name}/{subfolder} on {len(eval_ids)} images"))
    return result


def score_png_folder(layout, png_dir: Path, eval_ids: list, logger) -> float | None:
    """mIoU of the label PNGs in ``png_dir`` on ``eval_ids`` (report in ``<png_dir>/../eval/``), computed on rank 0
    (None on the other ranks, or when masks are missing or an id was not produced); every rank waits for it."""
    miou = None
    if dist.is_main():
        done = {p.stem for p in png_dir.glob("*.png")}
        evaluation = evaluate_outputs(layout, png_dir.parent, png_dir.name, eval_ids, logger, done)
        miou = evaluation["miou"] if evaluation else None
    dist.barrier()
    return miou
