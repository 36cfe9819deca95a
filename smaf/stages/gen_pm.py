"""Stage 3: pseudo masks (``bash script/gen_pm.sh``).

The self-trained model (``pseudo_masks.checkpoint``, default stage 2's ``final.pth``) produces multi-scale fused
maps with the stage-1 code path (:func:`smaf.cam.writer.generate_fused_outputs`, settings of the ``inference``
section), written to ``<work_dir>/<pseudo_masks.out_subdir>/``: ``cam_npy/`` (fused maps), ``cam_png/`` (pseudo
masks, argmax over [background score; maps]), ``overlays/``. Then, unless ``pseudo_masks.crf=false``, the dense
CRF (``crf.*`` constants, :mod:`smaf.refine`) writes ``crf_png/``. Both mask folders are evaluated
(``eval/*.json``) when ground truth exists for ``pseudo_masks.eval_list``.
"""
from __future__ import annotations

import torch

from .. import dist
from ..cam.background import BackgroundRule
from ..cam.report import evaluate_outputs
from ..cam.writer import generate_fused_outputs
from ..checkpoint import describe, load_model
from ..data.voc import VOCLayout, check_inputs
from ..refine import CRFLabelRefiner, refine_folder
from ..run_layout import CAM_PNG, CRF_PNG, RunLayout
from ..runtime import available_cores, pick, prepare_output, stage_main


def run(cfg) -> dict:
    """Stage 3. Returns {'miou': plain mask mIoU or None, 'miou_crf': CRF mask mIoU or None, 'out_dir',
    'bg_scores' (as stage 1's)}."""
    sect, inf = cfg.pseudo_masks, cfg.inference
    # every input is checked before anything is written: the rule, the lists, the images, the model's classes
    bg_rule = BackgroundRule.from_section(inf, "inference")
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(pick(sect.list, cfg.data.train_list))
    eval_ids = layout.read_list(pick(sect.eval_list, cfg.data.infer_list))
    check_inputs(layout, list(dict.fromkeys(ids + eval_ids)), "pseudo_masks.list / pseudo_masks.eval_list",
                 mask_ids=eval_ids if layout.has_masks(eval_ids) else None, mask_values=True)
    runs = RunLayout(cfg)
    ckpt = runs.input("pseudo_masks", "checkpoint")
    model, spec = load_model(ckpt, producer=runs.producer("pseudo_masks", "checkpoint"),
                             num_classes=layout.num_classes, key="pseudo_masks.checkpoint", layout=layout)
    out_dir, logger, device, layout = prepare_output(cfg, "pseudo_masks", "gen_pm", layout=layout)
    model = model.to(device)
    logger.info("pseudo masks with %s (%s) on %d images, scales %s flip %s, background score %s", ckpt,
                describe(spec), len(ids), list(inf.scales), inf.flip, bg_rule)
    generate_fused_outputs(model, layout, ids, out_dir, device, logger, inf, bg_rule, amp=cfg.amp,
                           num_workers=cfg.num_workers, num_overlays=sect.overlays, desc="pseudo masks")
    dist.barrier()
    result = {"out_dir": out_dir, "miou": None, "miou_crf": None}
    if dist.is_main():
        evaluation = evaluate_outputs(layout, out_dir, CAM_PNG, eval_ids, logger, set(ids), bg_rule=bg_rule)
        result["miou"] = evaluation["miou"] if evaluation else None
        result["bg_scores"] = evaluation.get("bg_scores") if evaluation else None
    dist.barrier()
    # The CRF pool forks this process: without the model it is smaller, so the workers start faster (a 2 GB
    # parent made the fork + teardown of 2 workers cost 0.14 s instead of 0.02 s) and CUDA memory is freed.
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if sect.crf:
        mine = dist.shard(ids)
        workers = cfg.crf.workers or available_cores()
        logger.info("dense CRF on %d masks with %d workers -> %s", len(mine), workers, out_dir / CRF_PNG)
        refine_folder(layout, out_dir / CAM_PNG, out_dir / CRF_PNG, mine, CRFLabelRefiner.from_config(cfg.crf, layout.num_classes),
                      workers, overlay_ids=mine[:cfg.crf.overlays], desc="crf")
        dist.barrier()
        if dist.is_main():
            evaluation = evaluate_outputs(layout, out_dir, CRF_PNG, eval_ids, logger, set(ids))
            result["miou_crf"] = evaluation["miou"] if evaluation else None
        dist.barrier()
    return result


def main(argv=None):
    stage_main(run, "Stage 3: pseudo masks (multi-scale fused maps of the self-trained model, then dense CRF).",
               argv)


if __name__ == "__main__":
    main()
