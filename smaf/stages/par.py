"""PAR over a folder of CAM ``.npy`` dicts, as its own step (``python -m smaf.stages.par`` / ``bash script/par.sh``).

AFA's pixel-adaptive refinement (:mod:`smaf.refine.par`; constants ``par.*``, background score of the
``inference`` section's rule). Reads ``par.input_dir/<id>.npy`` (default: stage 1's ``fusion/cam_npy``; any CAM
folder works, stage 3's ``pseudo_masks/cam_npy`` included) and the images; writes under
``<work_dir>/<par.out_subdir>/``:

    cam_npy/<id>.npy   the refined maps PAR(M) of the labelled classes (a CAM dict, at image size)
    cam_png/<id>.png   argmax over [background score; PAR(M)], VOC numbering (written last: marks the image done)
    overlays/          image | mask + PAR for the first ``par.overlays`` images
    eval/cam_png.json  mIoU on ``par.eval_list`` when its masks exist and every id was refined

On CUDA PAR runs in this process on the GPU; on a CPU in a pool of ``par.workers`` processes (0 = the cores).
Finished images are skipped.
"""
from __future__ import annotations

import time

from .. import dist
from ..cam.background import BackgroundRule
from ..cam.report import score_png_folder
from ..refine.par import PARParams, PARRefiner
from ..refine.pool import cam_folder_ids, refine_folder
from ..run_layout import CAM_NPY, CAM_PNG, RunLayout
from ..runtime import available_cores, pick, prepare_output, stage_main


def run(cfg) -> dict:
    """PAR step. Returns {'miou': mIoU of the refined PNGs or None, 'out_dir', 'png_dir', 'npy_dir', 'refined':
    images refined by this call, 'seconds': wall time of the refinement}."""
    sect = cfg.par
    runs = RunLayout(cfg)
    input_dir = runs.input("par", "input_dir")
    params = PARParams.from_config(sect)                                 # bad values fail before any output
    bg_rule = BackgroundRule.from_section(cfg.inference, "inference")
    out_dir, logger, device, layout = prepare_output(cfg, "par")
    ids = dist.shard(cam_folder_ids(layout, input_dir, sect.list, "par.input_dir", runs.producer("par", "input_dir")))
    workers = 1 if device.type == "cuda" else (sect.workers or available_cores())
    refiner = PARRefiner(params, bg_rule, device if workers == 1 else "cpu")
    png_dir, npy_dir = out_dir / CAM_PNG, out_dir / CAM_NPY
    logger.info("PAR (dilations %s, %d iterations, scale %.2f, background %s) on %d CAM dicts from %s, %s -> %s",
                list(params.dilations), params.iterations, params.scale, bg_rule, len(ids), input_dir,
                f"{workers} workers" if workers > 1 else device, out_dir)
    start = time.perf_counter()
    refined = refine_folder(layout, input_dir, png_dir, ids, refiner, workers, overlay_ids=ids[:sect.overlays],
                            desc="par", npy_dir=npy_dir)
    seconds = time.perf_counter() - start
    if refined:
        logger.info("refined %d images in %.1f s (%.2f images/s)", refined, seconds, refined / max(seconds, 1e-9))
    dist.barrier()
    result = {"miou": None, "out_dir": out_dir, "png_dir": png_dir, "npy_dir": npy_dir, "refined": refined,
              "seconds": seconds}
    result["miou"] = score_png_folder(layout, png_dir, layout.read_list(pick(sect.eval_list, cfg.data.infer_list)),
                                      logger)
    return result


def main(argv=None):
    stage_main(run, "PAR (AFA's pixel-adaptive refinement) over a folder of CAM .npy dicts.", argv)


if __name__ == "__main__":
    main()
