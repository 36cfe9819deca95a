"""Segmentation inference over an id list with the keys of one config section: the one code path of stage 4
(``infer_seg``, :mod:`smaf.stages.infer_seg`) and of AFA's decoder (``infer_afa``, :mod:`smaf.stages.infer_afa`).

:func:`run_section` checks every input, loads the checkpoint, averages multi-scale x flip probabilities on the
device (:func:`smaf.seg.writer.segment_items`), optionally runs the dense CRF, writes palette PNGs, overlays and
``speed.json`` under ``<work_dir>/<section.out_subdir>/``, and evaluates on the section's ``eval_list``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import dist
from ..cam.report import evaluate_outputs
from ..checkpoint import describe, load_model
from ..config import ConfigError
from ..data.voc import VOCLayout, check_inputs, read_id_list
from ..io import atomic_save
from ..models.fold import inference_copy
from ..refine.crf import CRFParams
from ..run_layout import CRF_PNG, OVERLAYS, SEG_PNG, RunLayout
from ..runtime import StageError, available_cores, check_positive, pick, prepare_output
from .writer import SegOutputs, segment_items

SPEED_FILE = "speed.json"


def crf_params(sect) -> CRFParams:
    """The CRF constants of an inference section (``infer_seg``: DeepLab's by default; ``infer_afa``: AFA's)."""
    return CRFParams(0.7, float(sect.gauss_sxy), float(sect.gauss_compat), float(sect.bi_sxy), float(sect.bi_srgb),
                     float(sect.bi_compat), int(sect.iterations))


def run_section(cfg, section: str, architectures) -> dict:
    """Segmentation inference with the keys of config section ``section`` (``infer_seg``, ``infer_afa``) on a
    checkpoint of one of ``architectures`` (any network whose ``forward(x)`` returns (B, C + 1, h, w) logits).
    Returns ``{'miou': mIoU of seg_png or None, 'miou_crf': of crf_png or None, 'out_dir', 'png_dir', 'crf_dir'
    (None without CRF), 'images', 'images_per_s', 'network_seconds', 'seconds'}`` (the speed keys describe this
    call: 0 images when every output existed)."""
    sect = cfg[section]
    runs = RunLayout(cfg)
    scales = [float(s) for s in (sect.scales or [])]
    if not scales or min(scales) <= 0:
        raise ConfigError(f"{section}.scales={list(sect.scales)}: expected a list of positive scales, e.g. "
                          f"[0.5, 0.75, 1.0]")
    check_positive(sect, section, ("batch_size",), ("base_long", "overlays", "crf_workers"))
    params = crf_params(sect)
    # every input is checked before anything is written: lists, images, masks, the checkpoint and its classes
    layout = VOCLayout.from_config(cfg)
    list_path = pick(sect.list, cfg.data.val_list)
    eval_path = pick(sect.eval_list, list_path)
    ids = read_id_list(list_path)
    eval_ids = read_id_list(eval_path)
    has_masks = layout.has_masks(eval_ids)
    check_inputs(layout, list(dict.fromkeys(ids + eval_ids)), f"{section}.list / {section}.eval_list",
                 mask_ids=eval_ids if has_masks else None, mask_values=True)
    ckpt = runs.input(section, "checkpoint")
    producer = runs.producer(section, "checkpoint")
    model, spec = load_model(ckpt, producer=producer, num_classes=layout.num_classes, key=f"{section}.checkpoint",
                             layout=layout)
    if spec["arch"] not in architectures:
        raise StageError(f"{section}.checkpoint '{ckpt}' holds a {spec['arch']} network, not a segmentation network "
                         f"({', '.join(architectures)}): give the final.pth of {producer}")
    out_dir, logger, device, layout = prepare_output(cfg, section, layout=layout)
    model, note = inference_copy(model.to(device), device)
    if note:
        logger.info("%s", note)
    outputs = SegOutputs(out_dir / SEG_PNG, out_dir / CRF_PNG if sect.crf else None, out_dir / OVERLAYS)
    mine = dist.shard(ids)
    crf_workers = int(sect.crf_workers) or available_cores()
    logger.info("segmenting %d images with %s (%s) on %s: scales %s, flip %s, %s%s", len(mine), ckpt,
                describe(spec), device, scales, sect.flip,
                f"long side {sect.base_long}" if sect.base_long else "original size",
                f", then the dense CRF ({crf_workers} workers)" if sect.crf else "")
    speed = segment_items(model, [(i, layout.image_path(i)) for i in mine], outputs, device, logger, scales,
                          bool(sect.flip), int(sect.base_long), str(sect.resize), cfg.amp, cfg.num_workers,
                          int(sect.batch_size), params if sect.crf else None, crf_workers,
                          overlay_names=ids[:int(sect.overlays)], class_names=layout.class_names, desc=section)
    if speed["images"]:
        logger.info("segmented %d images in %.1f s: %.2f images/s (network, %d scales%s)%s", speed["images"],
                    speed["network_seconds"], speed["images_per_s"], len(scales), " x flip" if sect.flip else "",
                    f"; {speed['seconds']:.1f} s with the CRF ({speed['images'] / speed['seconds']:.2f} images/s)"
                    if sect.crf else "")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    result = {"miou": None, "miou_crf": None, "out_dir": out_dir, "png_dir": outputs.png_dir,
              "crf_dir": outputs.crf_dir, **{k: speed[k] for k in ("images", "images_per_s", "network_seconds",
                                                                    "seconds")}}
    if dist.is_main():
        if speed["images"]:
            text = json.dumps({k: speed[k] for k in ("images", "network_seconds", "seconds", "images_per_s")} |
                              {"device": str(device), "scales": scales, "flip": bool(sect.flip),
                               "crf": bool(sect.crf)}, indent=2)
            atomic_save(out_dir / SPEED_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
        done = {p.stem for p in outputs.png_dir.glob("*.png")}
        evaluation = evaluate_outputs(layout, out_dir, SEG_PNG, eval_ids, logger, done)
        result["miou"] = evaluation["miou"] if evaluation else None
        if sect.crf:
            done = {p.stem for p in outputs.crf_dir.glob("*.png")}
            evaluation = evaluate_outputs(layout, out_dir, CRF_PNG, eval_ids, logger, done)
            result["miou_crf"] = evaluation["miou"] if evaluation else None
    dist.barrier()
    return result
