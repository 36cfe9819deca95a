"""The whole pipeline in one command, with every stage measured (``bash script/demo.sh``,
``bash script/bench_pets.sh``).

Runs stage 0 on the training list; stage 1 single-scale (the baseline) and multi-scale on the training
and validation lists; stage 2 once per denoising setting; stage 3 on both lists for each setting, with the
CRF step for the config's default setting. Prints one table of mIoU (train = pseudo-mask quality, val)
with the config's background rule (a fixed score, or per-image Otsu: never tuned on ground truth; with
Otsu the same maps are also scored at the fixed ``inference.bg_threshold`` for comparison), the wall time of
each stage, and writes ``summary.json``, ``summary.md`` and ``figure.jpg`` (image | GT | single-scale CAM |
fused CAM | final mask for a few validation images) into ``work_dir``.

Every stage skips finished outputs, so re-running after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .config import derive, load_config
from .run_layout import CAM_NPY, CAM_PNG, CRF_PNG


def _variant_name(denoise: bool) -> str:
    return "denoise_on" if denoise else "denoise_off"


def run_pipeline(cfg, denoise_variants=None, figure_rows: int = 4, log=print) -> dict:
    """Run and measure every stage. Returns the summary dict (also written to ``<work_dir>/summary.json``)."""
    from .stages import gen_fusion, gen_pm, train_cls, train_fusion

    default_denoise = bool(cfg.train_fusion.denoise)
    variants = list(dict.fromkeys(denoise_variants if denoise_variants is not None else [default_denoise]))
    # (generation list, evaluation list); stage 2 needs the fused maps of every training image
    lists = {"train": (cfg.data.train_list, cfg.data.infer_list), "val": (cfg.data.val_list, cfg.data.val_list)}
    splits = tuple(lists)
    timings, miou = {}, {split: {} for split in splits}
    folders = {split: {} for split in splits}     # column -> the stage folder it was measured from
    bg_scores = {split: {} for split in splits}   # column -> spread of the per-image background scores
    work = Path(cfg.work_dir)

    def record(split, column, result):
        miou[split][column] = result["miou"]
        folders[split][column] = Path(result["out_dir"])
        if result.get("bg_scores"):
            bg_scores[split][column] = result["bg_scores"]

    # A stage whose outputs already exist is skipped in seconds; it keeps the wall time measured when it ran.
    timings_file = Path(cfg.work_dir) / "timings.json"
    measured = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        elapsed = round(time.perf_counter() - start, 1)
        resumed = name in measured and elapsed < 0.2 * measured[name]
        timings[name] = measured[name] if resumed else elapsed
        measured[name] = timings[name]
        timings_file.write_text(json.dumps(measured, indent=2))
        log(f"== {name}: {timings[name]:.1f} s" + (" (measured when it ran; outputs reused now)" if resumed else ""))
        return out

    timed("stage 0: train classifier", train_cls.run, cfg)
    for split in splits:
        gen_list, eval_list = lists[split]
        single = derive(cfg, inference__scales=[1.0], inference__flip=False,
                        fusion__out_subdir=f"fusion_single_{split}", fusion__list=gen_list, fusion__eval_list=eval_list)
        record(split, "single-scale CAM", timed(f"stage 1 single-scale ({split})", gen_fusion.run, single))
        multi = derive(cfg, fusion__out_subdir=cfg.fusion.out_subdir if split == "train" else f"fusion_{split}",
                       fusion__list=gen_list, fusion__eval_list=eval_list)
        record(split, "fused multi-scale CAM", timed(f"stage 1 multi-scale ({split})", gen_fusion.run, multi))
    for denoise in variants:
        name = _variant_name(denoise)
        stage2 = derive(cfg, train_fusion__denoise=denoise, train_fusion__out_subdir=f"train_fusion_{name}")
        timed(f"stage 2: self-training ({name})", train_fusion.run, stage2)
        for split in splits:
            gen_list, eval_list = lists[split]
            with_crf = denoise == default_denoise
            stage3 = derive(stage2, pseudo_masks__out_subdir=f"pseudo_masks_{name}_{split}",
                            pseudo_masks__list=gen_list, pseudo_masks__eval_list=eval_list,
                            pseudo_masks__crf=with_crf)
            result = timed(f"stage 3: pseudo masks{' + CRF' if with_crf else ''} ({name}, {split})", gen_pm.run,
                           stage3)
            record(split, f"self-trained ({name.replace('_', ' ')})", result)
            if with_crf:
                miou[split][f"self-trained ({name.replace('_', ' ')}) + CRF"] = result["miou_crf"]
    summary = {"config": cfg.get("config_name", ""), "work_dir": str(cfg.work_dir),
               "backbone": cfg.model.backbone, "bg_method": cfg.inference.bg_method,
               "bg_threshold": cfg.inference.bg_threshold, "default_denoise": default_denoise,
               "miou": miou, "bg_scores": bg_scores, "timings_s": timings,
               "total_s": round(sum(timings.values()), 1)}
    if cfg.inference.bg_method != "fixed":
        npy_dirs = {split: {c: d / CAM_NPY for c, d in cols.items()} for split, cols in folders.items()}
        summary["miou_fixed"] = fixed_score_comparison(cfg, npy_dirs, float(cfg.inference.bg_threshold), log)
    figure_split = "val" if folders["val"] else "train"
    final_column = f"self-trained ({_variant_name(default_denoise).replace('_', ' ')})"
    summary["figure"] = str(make_figure(cfg, work, folders[figure_split], final_column, figure_rows))
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    (work / "summary.md").write_text(format_summary(summary))
    return summary


def fixed_score_comparison(cfg, npy_dirs: dict, threshold: float, log=print) -> dict:
    """mIoU of every column's CAM dicts at the fixed background score ``threshold`` (no CRF), to set the
    per-image rule of the config beside the constant. Returns {split: {column: mIoU or None}}."""
    from .data.voc import VOCLayout
    from .evaluate import evaluate_folder

    layout = VOCLayout.from_config(cfg)
    names = ["background"] + layout.class_names
    lists = {"train": cfg.data.infer_list, "val": cfg.data.val_list}
    out = {}
    for split, columns in npy_dirs.items():
        ids = layout.read_list(lists[split])
        if not layout.has_masks(ids):
            continue
        out[split] = {c: evaluate_folder(d, layout.mask_dir, ids, names, bg_threshold=threshold,
                                         desc=f"fixed {threshold:.2f}: {c} ({split})")["miou"]
                      for c, d in columns.items()}
        log(f"== at the fixed background score {threshold:.2f} ({split}): "
            + ", ".join(f"{c} {v:.2f}" for c, v in out[split].items()))
    return out


def _bg_rule_line(summary: dict) -> str:
    if summary.get("bg_method", "fixed") == "fixed":
        return (f"background threshold {summary['bg_threshold']:.2f} (fixed by the config, not tuned on ground "
                f"truth)")
    spread = []
    for split, columns in summary.get("bg_scores", {}).items():
        for column, s in columns.items():
            spread.append(f"{column} ({split}) {s['median']:.2f} [{s['p10']:.2f}-{s['p90']:.2f}]")
    return ("background threshold: per-image Otsu threshold of each image's own fused map (config "
            "`inference.bg_method: otsu`; no ground truth involved). Median [10th-90th percentile] of the "
            "thresholds used: " + "; ".join(spread))


def format_summary(summary: dict) -> str:
    """Markdown table: one column per method, one row per split (and per split at the fixed score when the
    config's rule is per-image); then the background rule and the stage timings."""
    splits = list(summary["miou"])
    columns = list(dict.fromkeys(k for s in splits for k in summary["miou"][s]))
    columns.sort(key=lambda c: c.endswith("+ CRF"))   # stable: the CRF column last, as the final masks
    lines = [f"| mIoU (%) | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    fixed = summary.get("miou_fixed") or {}

    def row(label, values):
        cells = [values.get(c) for c in columns]
        return f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |"

    for split in splits:
        lines.append(row(split, summary["miou"][split]))
    for split in splits:
        if split in fixed:
            lines.append(row(f"{split}, fixed {summary['bg_threshold']:.2f} (comparison)", fixed[split]))
    lines += ["", _bg_rule_line(summary) + f"; backbone {summary['backbone']}", "", "| stage | wall time (s) |",
              "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    lines.append(f"| total | {summary['total_s']:.1f} |")
    return "\n".join(lines) + "\n"


def make_figure(cfg, work: Path, folders: dict, final_column: str, rows: int) -> Path:
    """Grid of images of one split: image | ground truth | single-scale CAM | fused CAM | final mask (+CRF).
    ``folders``: column name -> stage folder (as :func:`run_pipeline` records them)."""
    from .data.voc import VOCLayout
    from .io import load_cam_dict, load_label_png, make_panel, overlay, save_image

    layout = VOCLayout.from_config(cfg)
    final_dir = folders[final_column]
    final_sub = CRF_PNG if (final_dir / CRF_PNG).is_dir() else CAM_PNG
    ids = sorted(p.stem for p in (final_dir / final_sub).glob("*.png"))[:rows]
    strips = []
    for image_id in ids:
        image = layout.load_image(image_id)
        tiles = [image]
        gt_path = layout.mask_path(image_id)
        tiles.append(overlay(image, label=load_label_png(gt_path)) if gt_path and gt_path.is_file() else image)
        for column in ("single-scale CAM", "fused multi-scale CAM"):
            cams = load_cam_dict(folders[column] / CAM_NPY / f"{image_id}.npy")
            heat = np.max(np.stack(list(cams.values())), 0) if cams else np.zeros(image.shape[:2], np.float32)
            tiles.append(overlay(image, heat=heat))
        tiles.append(overlay(image, label=load_label_png(final_dir / final_sub / f"{image_id}.png")))
        strips.append(make_panel(tiles, ["image", "ground truth", "single-scale CAM", "fused CAM",
                                         "final mask" + (" (CRF)" if final_sub == CRF_PNG else "")]))
    if not strips:
        return Path()
    width = max(s.shape[1] for s in strips)
    grid = np.concatenate([np.pad(s, ((0, 6), (0, width - s.shape[1]), (0, 0)), constant_values=255)
                           for s in strips], 0)
    return save_image(work / "figure.jpg", grid)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run and measure the whole pipeline (stages 0-3 + CRF).")
    parser.add_argument("--config", default=os.environ.get("CONFIG", "demo"))
    parser.add_argument("--denoise", choices=("default", "both"), default="default",
                        help="stage 2 with the config's denoise setting only, or with both settings (ablation)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    from .runtime import expected_errors

    with expected_errors():
        cfg = load_config(args.config, args.overrides)
        variants = [False, True] if args.denoise == "both" else None
        summary = run_pipeline(cfg, variants)
    print()
    print(format_summary(summary))
    print(f"overlays: {summary['work_dir']}/*/overlays/   figure: {summary['figure']}   "
          f"summary: {summary['work_dir']}/summary.md")


if __name__ == "__main__":
    main()
