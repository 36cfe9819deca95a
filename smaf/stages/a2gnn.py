"""A2GNN over a folder of CAM ``.npy`` dicts (or boxes) with a trained AffinityNet (related-methods.md §8;
``python -m smaf.stages.a2gnn`` / ``bash script/a2gnn.sh``; docs/a2gnn.md).

Preset ``image``: seeds from ``a2gnn.cam_dir/<id>.npy`` by A2GNN's confident-seed rule (a CRF process pool).
Preset ``box``: seeds from the boxes of ``a2gnn.box_dir`` (``<id>.txt`` / VOC ``<id>.xml``; ``masks`` = tight
boxes of the ground-truth masks, for benchmarking). Then, a few images at a time (``a2gnn.graphs_per_step``),
one graph network per image is trained from scratch on the AffinityNet features of ``a2gnn.checkpoint`` and its
output (+ the random walk with preset image) goes through the dense CRF. Writes under
``<work_dir>/<a2gnn.out_subdir>/``:

    seeds/<id>.png     the seeds (0 background, c+1 class c, 255 unlabelled)
    boxes/<id>.txt     preset box: the boxes used (the text box format)
    cam_npy/<id>.npy   the final scores of the image's classes (a CAM dict, at image size)
    cam_png/<id>.png   the pseudo mask (written last: marks the image done)
    overlays/          image | seeds | mask + A2GNN for the first ``a2gnn.overlays`` images
    eval/cam_png.json  mIoU on ``a2gnn.eval_list`` when its masks exist and every id was refined
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from .. import dist
from ..cam.report import score_png_folder
from ..checkpoint import describe, load_model
from ..config import ConfigError
from ..io import load_cam_dict, load_image, load_label_png, overlay, save_cam_dict, save_label_png, save_panel
from ..models.a2gnn import TrainParams
from ..refine.a2gnn import A2GNN_RW, A2GNNParams, A2GNNRefiner
from ..refine.a2gnn_boxes import (box_seeds, boxes_from_mask, grabcut_box_seeds, read_box_file, read_boxes,
                                  write_box_file)
from ..refine.a2gnn_seeds import SeedParams, SeedRefiner, seed_statistics
from ..refine.crf import CRFParams
from ..refine.random_walk import RandomWalkParams
from ..refine.pool import cam_folder_ids, refine_folder
from ..run_layout import BOXES, CAM_NPY, CAM_PNG, OVERLAYS, SEEDS, RunLayout
from ..runtime import StageError, check_positive, default_workers, pick, prepare_output, stage_main

PRESETS = ("image", "box")
#: ``a2gnn.box_seeds``: GrabCut inside each box (the rest of the box unlabelled) or the whole box as the class.
BOX_SEEDS = ("grabcut", "box")


def params_from_config(cfg) -> A2GNNParams:
    """A2GNNParams of the ``a2gnn`` section and its preset; a bad value is a ConfigError naming the key."""
    sect = cfg.a2gnn
    preset = sect.get(str(sect.preset)) or {}
    check_positive(sect, "a2gnn", ("hidden", "layers", "gcrf_radius", "iterations"), ("graphs_per_step", "seed_workers"))
    try:
        train = TrainParams(int(preset["epochs"]), float(preset["lr"]), float(sect.weight_decay), int(sect.hidden),
                            int(sect.layers), float(sect.dropout), float(sect.adjacency_weight),
                            int(preset["window_radius"]), float(preset["gcrf_weight"]), int(sect.gcrf_radius),
                            float(sect.gcrf_xy), float(sect.gcrf_rgb), float(preset["mil_weight"]))
        rw = RandomWalkParams(float(sect.rw_beta), int(sect.rw_logt), A2GNN_RW.radius, "power",
                              float(sect.rw_alpha))
        crf = CRFParams(0.7, float(sect.gauss_sxy), float(sect.gauss_compat), float(sect.bi_sxy), float(sect.bi_srgb),
                        float(sect.bi_compat), int(sect.iterations))
        params = A2GNNParams(train, bool(preset["rw"]), float(sect.rw_weight), rw, bool(sect.crf), crf,
                             int(cfg.inference.base_long), SeedParams.from_config(sect.seeds, cfg.inference))
    except KeyError as err:
        raise ConfigError(f"a2gnn.{sect.preset} lacks the key {err} (needs epochs, lr, window_radius, gcrf_weight, "
                          f"rw, mil_weight)") from None
    except ValueError as err:
        raise ConfigError(f"a2gnn: {err}") from None
    if train.epochs < 1 or train.window_radius < 1:
        raise ConfigError(f"a2gnn.{sect.preset}: epochs and window_radius must be >= 1")
    return params


def _make_box_seeds(layout, ids, box_dir: str, seed_dir, box_out, logger, how: str = "grabcut",
                    iterations: int = 5) -> None:
    """Seeds (and the boxes used, as text box files) of preset box: ``how`` = grabcut (GrabCut inside each box,
    the rest of the box unlabelled) or box (the whole box)."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    box_out.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        if (seed_dir / f"{image_id}.png").is_file() and (box_out / f"{image_id}.txt").is_file():
            continue
        image = layout.load_image(image_id)
        size = image.shape[:2]
        if box_dir == "masks":
            boxes = boxes_from_mask(layout.load_mask(image_id))
        else:
            boxes = read_boxes(box_dir, image_id, layout.class_names, size)
        write_box_file(box_out / f"{image_id}.txt", boxes)
        seeds = (grabcut_box_seeds(image, boxes, iterations) if how == "grabcut" else
                 box_seeds(size, boxes))
        save_label_png(seed_dir / f"{image_id}.png", seeds)
    logger.info("box seeds (%s) of %d images from %s", how, len(ids),
                "the ground-truth masks (tight boxes of each region; benchmarking only)" if box_dir == "masks"
                else box_dir)


def run(cfg) -> dict:
    """A2GNN step. Returns {'miou', 'out_dir', 'png_dir', 'npy_dir', 'seed_dir', 'refined', 'seconds',
    'seed_stats'}."""
    sect = cfg.a2gnn
    if str(sect.preset) not in PRESETS:
        raise ConfigError(f"a2gnn.preset={sect.preset!r}: expected one of {', '.join(PRESETS)}")
    params = params_from_config(cfg)                                     # bad values fail before any output
    runs = RunLayout(cfg)
    ckpt = runs.input("a2gnn", "checkpoint")
    box = str(sect.preset) == "box"
    box_dir = str(sect.box_dir)
    if box and str(sect.box_seeds) not in BOX_SEEDS:
        raise ConfigError(f"a2gnn.box_seeds={sect.box_seeds!r}: expected one of {', '.join(BOX_SEEDS)}")
    if box and not box_dir:
        raise ConfigError("a2gnn.preset=box needs a2gnn.box_dir: a folder of <id>.txt / <id>.xml boxes, or 'masks'")
    need_cams = not box or params.rw
    cam_dir = runs.input("a2gnn", "cam_dir") if need_cams else None
    out_dir, logger, device, layout = prepare_output(cfg, "a2gnn")
    if need_cams:
        ids = cam_folder_ids(layout, cam_dir, sect.list, "a2gnn.cam_dir", runs.producer("a2gnn", "cam_dir"))
    else:
        ids = layout.read_list(pick(sect.list, cfg.data.infer_list))
    ids = dist.shard(ids)
    model, spec = load_model(ckpt, producer=runs.producer("a2gnn", "checkpoint"), device=device)
    if spec["arch"] != "affinity_net":
        raise StageError(f"a2gnn.checkpoint '{ckpt}' holds a {spec['arch']} network, not an AffinityNet: give the "
                         f"final.pth of {runs.producer('a2gnn', 'checkpoint')}")

    seed_dir, png_dir, npy_dir = out_dir / SEEDS, out_dir / CAM_PNG, out_dir / CAM_NPY
    start = time.perf_counter()
    if box:
        _make_box_seeds(layout, ids, box_dir, seed_dir, out_dir / BOXES, logger, str(sect.box_seeds),
                        int(sect.grabcut_iterations))
    else:
        made = refine_folder(layout, cam_dir, seed_dir, ids, SeedRefiner(params.seeds),
                             default_workers(int(sect.seed_workers) or 64), desc="a2gnn seeds")
        logger.info("seeds of %d images from %s (%d made now)", len(ids), cam_dir, made)
    stats = seed_statistics(np.concatenate([load_label_png(seed_dir / f"{i}.png").ravel() for i in ids]))
    logger.info("seeds: %.1f%% background, %.1f%% foreground, %.1f%% unlabelled", 100 * stats["background"],
                100 * stats["foreground"], 100 * stats["unlabelled"])

    per_step = int(sect.graphs_per_step) or (8 if device.type == "cuda" else 1)
    t = params.train
    logger.info("A2GNN (preset %s: %d + %d epochs, lr %g, window radius %d, gated CRF x%g%s%s) with %s (%s) on %d "
                "images, %d graph(s) per step, %s", sect.preset, t.epochs, t.epochs, t.lr, t.window_radius,
                t.gcrf_weight, f", + {params.rw_weight:g} x RW" if params.rw else "",
                ", MIL + consistency check" if box else "", ckpt, describe(spec), len(ids), per_step, device)
    refiner = A2GNNRefiner(model, params, layout.num_classes, device, seed=int(sect.seed))
    todo = [i for i in ids if not (png_dir / f"{i}.png").is_file()]
    overlay_ids = set(ids[:int(sect.overlays)])
    png_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="a2gnn", unit="img", dynamic_ncols=True, disable=not dist.is_main())
    log_every = max(1, len(todo) // 10)   # the log gets about ten lines; the bar shows every image
    for first in range(0, len(todo), per_step):
        chunk = todo[first:first + per_step]
        items = []
        for image_id in chunk:
            image = load_image(layout.image_path(image_id))
            seeds = load_label_png(seed_dir / f"{image_id}.png")
            cams = load_cam_dict(cam_dir / f"{image_id}.npy") if need_cams else None
            boxes = read_box_file(out_dir / BOXES / f"{image_id}.txt", layout.class_names) if box else []
            classes = sorted({b.cls for b in boxes}) if box else sorted(cams)
            if box and cams is not None and sorted(cams) != classes:
                cams = None                      # the CAMs do not name the boxes' classes: no walk for this image
            items.append({"id": image_id, "image": image, "seeds": seeds, "classes": classes, "cams": cams,
                          "boxes": boxes})
        results, logs = refiner.refine_batch(items)
        for item, (label, scores) in zip(items, results):
            save_cam_dict(npy_dir / f"{item['id']}.npy", scores)
            save_label_png(png_dir / f"{item['id']}.png", label)
            if item["id"] in overlay_ids:
                save_panel(out_dir / OVERLAYS / f"{item['id']}_a2gnn.jpg",
                           [item["image"], overlay(item["image"], label=item["seeds"]),
                            overlay(item["image"], label=label)], ["image", "seeds", "mask + A2GNN"])
        bar.update(len(chunk))
        bar.set_postfix(loss_b=f"{logs['loss_b'][1]:.3f}")
        done = first + len(chunk)
        if done % log_every < len(chunk) or done == len(todo):
            logger.info("%d/%d: loss A %.3f -> %.3f, B %.3f -> %.3f%s", done, len(todo), *logs["loss_a"],
                        *logs["loss_b"], f", {logs['dropped_seeds']} seeds dropped by the consistency check"
                        if box else "")
    bar.close()
    seconds = time.perf_counter() - start
    if todo:
        logger.info("A2GNN refined %d images in %.1f s (%.2f s per image, seeds included)", len(todo), seconds,
                    seconds / len(todo))
    dist.barrier()
    result = {"miou": None, "out_dir": out_dir, "png_dir": png_dir, "npy_dir": npy_dir, "seed_dir": seed_dir,
              "refined": len(todo), "seconds": seconds, "seed_stats": stats}
    result["miou"] = score_png_folder(layout, png_dir, layout.read_list(pick(sect.eval_list, cfg.data.infer_list)),
                                      logger)
    return result


def main(argv=None):
    stage_main(run, "A2GNN: seeds -> a graph network trained per image on AffinityNet features -> CRF.", argv)


if __name__ == "__main__":
    main()
