"""Random walk over a folder of CAM ``.npy`` dicts with a trained AffinityNet (PSA; ``python -m
smaf.stages.random_walk`` / ``bash script/random_walk.sh``).

Loads ``random_walk.checkpoint`` (default: ``train_aff/final.pth``), reads ``random_walk.cam_dir/<id>.npy``
(default: stage 1's ``fusion/cam_npy``; any CAM folder, e.g. ``par/cam_npy`` or ``pseudo_masks/cam_npy``) and
the images (long side ``inference.base_long`` when > 0), and walks each image's maps on the device
(:mod:`smaf.refine.random_walk`; beta, logt and the background of ``random_walk.preset``: psa, seam, ppc or
smaf). Writes under ``<work_dir>/<random_walk.out_subdir>/``:

    cam_npy/<id>.npy   the walked maps of the labelled classes (a CAM dict, at image size)
    cam_png/<id>.png   argmax over [background; walked maps] (written last: marks the image done)
    overlays/          image | mask + RW for the first ``random_walk.overlays`` images
    eval/cam_png.json  mIoU on ``random_walk.eval_list`` when its masks exist and every id was walked

Finished images are skipped; under torchrun each rank walks its share.
"""
from __future__ import annotations

import time

from .. import dist
from ..cam.background import BackgroundRule
from ..cam.report import score_png_folder
from ..checkpoint import describe, load_model
from ..refine.pool import cam_folder_ids, refine_folder
from ..refine.random_walk import RandomWalkParams, RandomWalkRefiner
from ..run_layout import CAM_NPY, CAM_PNG, RunLayout
from ..runtime import StageError, pick, prepare_output, stage_main


def run(cfg) -> dict:
    """Random walk step. Returns {'miou': mIoU of the walked PNGs or None, 'out_dir', 'png_dir', 'npy_dir',
    'refined': images walked by this call, 'seconds': wall time of the walk (network included)}."""
    sect = cfg.random_walk
    runs = RunLayout(cfg)
    cam_dir, ckpt = runs.input("random_walk", "cam_dir"), runs.input("random_walk", "checkpoint")
    params = RandomWalkParams.from_config(sect)                          # bad values fail before any output
    bg_rule = BackgroundRule.from_section(cfg.inference, "inference")
    out_dir, logger, device, layout = prepare_output(cfg, "random_walk")
    ids = dist.shard(cam_folder_ids(layout, cam_dir, sect.list, "random_walk.cam_dir",
                                    runs.producer("random_walk", "cam_dir")))
    model, spec = load_model(ckpt, producer=runs.producer("random_walk", "checkpoint"), device=device)
    if spec["arch"] != "affinity_net":
        raise StageError(f"random_walk.checkpoint '{ckpt}' holds a {spec['arch']} network, not an AffinityNet: "
                         f"give the final.pth of {runs.producer('random_walk', 'checkpoint')}")
    bg = {"power": f"power alpha {params.alpha:g}", "constant": f"constant {params.bg_threshold:g}",
          "rule": str(bg_rule)}[params.bg]
    logger.info("random walk (preset %s: beta %g, t = 2^%d, background %s, radius %d) with %s (%s) on %d CAM dicts "
                "from %s, %s", sect.preset, params.beta, params.logt, bg, params.radius, ckpt, describe(spec),
                len(ids), cam_dir, device)
    refiner = RandomWalkRefiner(model, params, bg_rule, int(cfg.inference.base_long), device)
    png_dir, npy_dir = out_dir / CAM_PNG, out_dir / CAM_NPY
    start = time.perf_counter()
    refined = refine_folder(layout, cam_dir, png_dir, ids, refiner, 1, overlay_ids=ids[:sect.overlays],
                            desc="random walk", npy_dir=npy_dir)
    seconds = time.perf_counter() - start
    if refined:
        logger.info("walked %d images in %.1f s (%.2f images/s)", refined, seconds, refined / max(seconds, 1e-9))
    dist.barrier()
    result = {"miou": None, "out_dir": out_dir, "png_dir": png_dir, "npy_dir": npy_dir, "refined": refined,
              "seconds": seconds}
    result["miou"] = score_png_folder(layout, png_dir, layout.read_list(pick(sect.eval_list, cfg.data.infer_list)),
                                      logger)
    return result


def main(argv=None):
    stage_main(run, "Random walk (PSA) of a folder of CAM .npy dicts with a trained AffinityNet.", argv)


if __name__ == "__main__":
    main()
