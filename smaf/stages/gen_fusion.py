"""Stage 1: multi-scale attention fusion (``bash script/gen_fusion.sh``).

For every image of ``fusion.list`` the stage-0 model (eval mode) runs at ``inference.scales`` x flip; the
fused maps M (C x H x W in [0, 1], see :mod:`smaf.cam.fusion`) are written to ``<work_dir>/<fusion.out_subdir>/``
(:mod:`smaf.cam.writer`)::

    cam_npy/<id>.npy      CAM dict {class: HxW float32} of labelled classes
    cam_png/<id>.png      argmax over [bg score; M], VOC numbering (inference.bg_threshold, or per image with
                          inference.bg_method otsu)
    proto_stats/<id>.npy  per-class mean feature f of the image
    prototypes.pt         (C+1) x D class prototypes (background last)
    overlays/             pictures of the first ``fusion.overlays`` images
    eval/cam_png.json     mIoU table when masks exist for ``fusion.eval_list``

With ``fusion.single_subdir`` the single-scale CAM (the unflipped scale-1.0 pass alone: what ``inference.scales
[1.0]``, ``inference.flip false`` would write, the baseline of every table) gets the same files and its own
``config.yaml`` in ``<work_dir>/<fusion.single_subdir>/``, from the same forward passes.

Finished images are skipped (every file is written atomically), so an interrupted run resumes. Under
torchrun each rank takes its share of the list.
"""
from __future__ import annotations

from pathlib import Path

from .. import dist
from ..cam.background import BackgroundRule
from ..cam.prototypes import aggregate_prototypes, save_prototypes
from ..cam.report import evaluate_outputs
from ..cam.writer import generate_fused_outputs, single_scale_index
from ..checkpoint import describe, load_model
from ..config import ConfigError, derive, save_config
from ..data.voc import VOCLayout, check_inputs
from ..run_layout import CAM_PNG, PROTOTYPES, RunLayout
from ..runtime import pick, prepare_output, stage_main


def run(cfg) -> dict:
    """Stage 1. Returns {'miou': float or None, 'out_dir': Path, 'num_images': int, 'bg_scores': the spread of
    per-image background scores (see :func:`smaf.cam.report.background_score_stats`) or None}; with
    ``fusion.single_subdir`` also 'single': the same dict (less 'num_images') for the single-scale CAM."""
    fus, inf = cfg.fusion, cfg.inference
    # every input is checked before anything is written: the rule, the lists, the images, the model's classes
    bg_rule = BackgroundRule.from_section(inf, "inference")
    single_subdir = str(fus.get("single_subdir", "") or "")
    if single_subdir:
        try:
            single_scale_index(inf.scales)
        except ValueError as err:
            raise ConfigError(f"fusion.single_subdir: {err}: add 1.0 to inference.scales or set "
                              "fusion.single_subdir=''") from None
        if single_subdir == fus.out_subdir:
            raise ConfigError(f"fusion.single_subdir '{single_subdir}' is fusion.out_subdir: give the single-scale "
                              "CAM a folder of its own")
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(pick(fus.list, cfg.data.train_list))
    eval_ids = layout.read_list(pick(fus.eval_list, cfg.data.infer_list))
    check_inputs(layout, list(dict.fromkeys(ids + eval_ids)), "fusion.list / fusion.eval_list",
                 mask_ids=eval_ids if layout.has_masks(eval_ids) else None, mask_values=True)
    runs = RunLayout(cfg)
    ckpt = runs.input("fusion", "checkpoint")
    model, spec = load_model(ckpt, producer=runs.producer("fusion", "checkpoint"), num_classes=layout.num_classes,
                             key="fusion.checkpoint", layout=layout)
    out_dir, logger, device, layout = prepare_output(cfg, "fusion", "gen_fusion", layout=layout)
    model = model.to(device)
    logger.info("model %s from %s | %d images | scales %s flip %s", describe(spec), ckpt, len(ids),
                list(inf.scales), inf.flip)
    logger.info("background score: %s", bg_rule)
    single_dir = None
    if single_subdir:
        single_dir = Path(cfg.work_dir) / single_subdir
        if dist.is_main():   # the folder documents itself as a single-scale run of the same model would
            save_config(derive(cfg, inference__scales=[1.0], inference__flip=False, fusion__out_subdir=single_subdir,
                               fusion__single_subdir=""), single_dir)
        logger.info("single-scale CAM (the scale-1.0 pass, no flip) -> %s", single_dir)
    generate_fused_outputs(model, layout, ids, out_dir, device, logger, inf, bg_rule, amp=cfg.amp,
                           num_workers=cfg.num_workers, num_overlays=fus.overlays,
                           prototype_min_pixels=max(1, int(fus.prototype_min_pixels)), desc="fusion",
                           single_dir=single_dir)
    dist.barrier()
    result = {"out_dir": out_dir, "num_images": len(ids), "miou": None}
    if dist.is_main():
        result.update(_finish_folder(out_dir, layout, ids, eval_ids, model.feat_dim, fus, bg_rule, logger))
        if single_dir is not None:
            result["single"] = {"out_dir": single_dir, **_finish_folder(single_dir, layout, ids, eval_ids,
                                                                        model.feat_dim, fus, bg_rule, logger)}
    dist.barrier()
    return result


def _finish_folder(folder: Path, layout, ids: list, eval_ids: list, feat_dim: int, fus, bg_rule, logger) -> dict:
    """Prototypes of a folder of per-image outputs, then its evaluation. Returns {'miou', 'bg_scores'}."""
    protos, counts = aggregate_prototypes(folder, ids, layout.num_classes, feat_dim)
    save_prototypes(folder / PROTOTYPES, protos, counts, layout.class_names, fus.prototype_min_pixels)
    empty = [n for n, c in zip(layout.class_names + ["background"], counts.tolist()) if c == 0]
    logger.info("prototypes (%d x %d) -> %s%s", protos.shape[0], protos.shape[1], folder / PROTOTYPES,
                f"; no image contributed to: {', '.join(empty)}" if empty else "")
    evaluation = evaluate_outputs(layout, folder, CAM_PNG, eval_ids, logger, set(ids), bg_rule=bg_rule)
    return {"miou": evaluation["miou"] if evaluation else None,
            "bg_scores": evaluation.get("bg_scores") if evaluation else None}


def main(argv=None):
    stage_main(run, "Stage 1: multi-scale attention fusion (fused CAMs, PNGs, prototypes).", argv)


if __name__ == "__main__":
    main()
