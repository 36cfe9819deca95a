"""Stage 3: pseudo masks (``bash script/gen_pm.sh``).

The self-trained model produces multi-scale fused maps with the stage-1 code
(:func:`smaf.stages.gen_fusion.generate_fused_outputs`), written to ``<work_dir>/<pseudo_masks.out_subdir>/``:
``cam_npy/`` (fused maps), ``cam_png/`` (pseudo masks, argmax over [bg threshold; maps]), ``overlays/``.
Then, unless ``pseudo_masks.crf=false``, the dense-CRF step (:mod:`smaf.stages.crf`) writes ``crf_png/``.
Both mask folders are evaluated (``eval/*.json``) when ground truth exists for ``pseudo_masks.eval_list``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import dist
from ..cam import BackgroundRule
from ..checkpoint import load_model
from . import crf as crf_step
from .common import pick, prepare_output
from .gen_fusion import evaluate_outputs, generate_fused_outputs


def run(cfg) -> dict:
    """Stage 3. Returns {'miou': plain mask mIoU or None, 'miou_crf': CRF mask mIoU or None, 'out_dir',
    'bg_scores' (as stage 1's)}."""
    sect = cfg.pseudo_masks
    out_dir, logger, device, layout = prepare_output(cfg, sect.out_subdir, "gen_pm")
    bg_rule = BackgroundRule.from_section(sect, "pseudo_masks")   # a bad rule fails before the model is loaded
    ids = layout.read_list(pick(sect.list, cfg.data.train_list))
    eval_ids = layout.read_list(pick(sect.eval_list, cfg.data.infer_list))
    ckpt = pick(sect.checkpoint, str(Path(cfg.work_dir) / cfg.train_fusion.out_subdir / "final.pth"))
    model, meta = load_model(ckpt, producer="stage 2 (bash script/train_fusion.sh)", device=device)
    logger.info("pseudo masks with %s (%s/%s) on %d images, scales %s flip %s, background score %s", ckpt,
                meta["backbone"], meta["head"], len(ids), list(cfg.fusion.scales), cfg.fusion.flip, bg_rule)
    generate_fused_outputs(cfg, model, layout, ids, out_dir, device, logger, bg_rule, sect.overlays,
                           prototypes=False, desc="pseudo masks")
    dist.barrier()
    result = {"out_dir": out_dir, "miou": None, "miou_crf": None}
    if dist.is_main():
        evaluation = evaluate_outputs(cfg, layout, out_dir, "cam_png", eval_ids, logger, set(ids), bg_rule=bg_rule)
        result["miou"] = evaluation["miou"] if evaluation else None
        result["bg_scores"] = evaluation.get("bg_scores") if evaluation else None
    dist.barrier()
    # The CRF pool forks this process: without the model it is smaller, so the workers start faster (a 2 GB
    # parent made the fork + teardown of 2 workers cost 0.14 s instead of 0.02 s) and CUDA memory is freed.
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if sect.crf:
        result["miou_crf"] = crf_step.run(cfg, out_subdir=sect.out_subdir)["miou"]
    return result


def main(argv=None):
    from .common import stage_main

    stage_main(run, "Stage 3: pseudo masks (multi-scale fused maps of the self-trained model, then dense CRF).",
               argv)


if __name__ == "__main__":
    main()
