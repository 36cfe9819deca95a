"""Dense CRF over saved label PNGs, as its own step (``python -m smaf.stages.crf`` / ``bash script/crf.sh``).

Reads ``crf.input_dir/<id>.png`` (default: stage 3's ``cam_png/``) and the images, writes
``crf.output_dir/<id>.png`` (default: ``crf_png/`` beside the input) with a process pool of ``crf.workers``
(0 = available cores; :func:`smaf.refine.pool.refine_folder`). Finished outputs are skipped; the masks are
evaluated on ``crf.eval_list`` when ground truth exists. Stage 3 runs the same refinement itself.
"""
from __future__ import annotations

from pathlib import Path

from .. import dist
from ..cam.report import score_png_folder
from ..data.voc import VOCLayout, check_inputs
from ..refine import CRFLabelRefiner, refine_folder
from ..run_layout import CRF_PNG, RunLayout
from ..runtime import StageError, available_cores, pick, prepare_output, stage_main


def run(cfg) -> dict:
    """CRF step. Returns {'miou': mIoU of the CRF masks or None, 'output_dir': Path}."""
    sect = cfg.crf
    runs = RunLayout(cfg)
    input_dir = runs.input("crf", "input_dir")
    # the inputs are checked before anything is written: the folder, its masks, their images
    if not input_dir.is_dir():
        raise StageError(f"CRF input folder '{input_dir}' not found: run {runs.producer('crf', 'input_dir')} first "
                         f"or set crf.input_dir")
    layout = VOCLayout.from_config(cfg)
    all_ids = sorted(p.stem for p in input_dir.glob("*.png"))
    if not all_ids:
        raise StageError(f"no PNG masks in '{input_dir}': run {runs.producer('crf', 'input_dir')} first or set "
                         f"crf.input_dir")
    check_inputs(layout, all_ids, f"the masks of crf.input_dir '{input_dir}'")
    out_dir, logger, _, layout = prepare_output(cfg, "crf", layout=layout)
    output_dir = Path(pick(sect.output_dir, str(input_dir.parent / CRF_PNG)))
    ids = dist.shard(all_ids)
    workers = sect.workers or available_cores()
    logger.info("dense CRF on %d masks from %s with %d workers -> %s", len(ids), input_dir, workers, output_dir)
    refine_folder(layout, input_dir, output_dir, ids, CRFLabelRefiner.from_config(sect, layout.num_classes), workers,
                  overlay_ids=ids[:sect.overlays], desc="crf")
    dist.barrier()
    result = {"output_dir": output_dir, "miou": None}
    result["miou"] = score_png_folder(layout, output_dir,
                                      layout.read_list(pick(sect.eval_list, cfg.data.infer_list)), logger)
    return result


def main(argv=None):
    stage_main(run, "Dense CRF over saved label PNGs (the pseudo-mask refinement step).", argv)


if __name__ == "__main__":
    main()
