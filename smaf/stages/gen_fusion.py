"""Stage 1: multi-scale attention fusion (``bash script/gen_fusion.sh``).

For every image of ``fusion.list`` the stage-0 model (eval mode) runs at ``fusion.scales`` x flip; the
fused maps M (C x H x W in [0, 1], see :mod:`smaf.cam`) are written to

    <work_dir>/<fusion.out_subdir>/cam_npy/<id>.npy      CAM dict {class: HxW float32} of labelled classes
    <work_dir>/<fusion.out_subdir>/cam_png/<id>.png      argmax over [bg score; M], VOC numbering (the score is
                                                         fusion.bg_threshold, or per image with bg_method otsu)
    <work_dir>/<fusion.out_subdir>/proto_stats/<id>.npy  per-class mean feature f of the image
    <work_dir>/<fusion.out_subdir>/prototypes.pt         (C+1) x D class prototypes (background last)
    <work_dir>/<fusion.out_subdir>/overlays/             pictures of the first ``fusion.overlays`` images
    <work_dir>/<fusion.out_subdir>/eval/cam_png.json     mIoU table when masks exist for ``fusion.eval_list``

Finished images are skipped (every file is written atomically), so an interrupted run resumes. Under
torchrun each rank takes its shard of the list. Stage 3 (:mod:`smaf.stages.gen_pm`) calls
:func:`generate_fused_outputs` with the self-trained model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import dist
from ..cam import BackgroundRule, class_feature_means, fuse_image, label_from_maps
from ..checkpoint import load_model
from ..data.voc import InferenceDataset, collate_single
from ..io import AsyncWriter, atomic_save, save_cam_dict, overlay, save_label_png, save_panel
from ..models.fold import inference_copy
from .common import available_cores, default_workers, pick, prepare_output


def _write_outputs(out_dir: Path, image_id: str, classes: list, maps: np.ndarray, label: np.ndarray,
                   proto_stats: dict | None) -> None:
    # The PNG is written last: its presence marks the image as finished for resume.
    save_cam_dict(out_dir / "cam_npy" / f"{image_id}.npy", {c: maps[i] for i, c in enumerate(classes)})
    if proto_stats is not None:
        save_cam_dict(out_dir / "proto_stats" / f"{image_id}.npy", {k: v.numpy() for k, v in proto_stats.items()})
    save_label_png(out_dir / "cam_png" / f"{image_id}.png", label)


def _write_overlay(out_dir: Path, image_id: str, image: np.ndarray, maps: np.ndarray, label: np.ndarray) -> None:
    heat = maps.max(0) if len(maps) else np.zeros(image.shape[:2], np.float32)
    save_panel(out_dir / "overlays" / f"{image_id}.jpg",
               [image, overlay(image, heat=heat), overlay(image, label=label)],
               ["image", "fused attention", "label (bg thr)"])


def is_finished(out_dir: Path, image_id: str, prototypes: bool) -> bool:
    done = (out_dir / "cam_png" / f"{image_id}.png").is_file() and (out_dir / "cam_npy" / f"{image_id}.npy").is_file()
    return done and (not prototypes or (out_dir / "proto_stats" / f"{image_id}.npy").is_file())


def generate_fused_outputs(cfg, model, layout, ids: list, out_dir: Path, device, logger, bg_rule: BackgroundRule,
                           num_overlays: int, prototypes: bool, desc: str) -> int:
    """Write cam_npy/, cam_png/ (and proto_stats/ when ``prototypes``) for this rank's share of ``ids``;
    ``bg_rule`` gives each image's background score for the PNG (and so for the prototypes).

    Returns the number of images processed (skipped finished ones excluded)."""
    fus = cfg.fusion
    model, note = inference_copy(model, device)   # the same maps, fewer passes over activations
    if note:
        logger.info("%s", note)
    if fus.channels_last and device.type == "cuda":
        # (weights the copy shares with the caller's model change layout in place: same values)
        model = model.to(memory_format=torch.channels_last)
    overlay_ids = set(ids[:num_overlays])
    mine = dist.shard(ids)
    todo = [i for i in mine if not is_finished(out_dir, i, prototypes)]
    if len(todo) < len(mine):
        logger.info("%d of %d images already done (skipped)", len(mine) - len(todo), len(mine))
    if not todo:
        return 0
    for sub in ("cam_npy", "cam_png") + (("proto_stats",) if prototypes else ()):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    dataset = InferenceDataset(layout, todo, scales=fus.scales, base_long=fus.base_long)
    workers = min(default_workers(cfg.num_workers), len(todo))   # no worker without an image to load
    fuse = _SampleFuser(model, fus, cfg.amp, bg_rule, layout.num_classes, prototypes, overlay_ids)
    # (not with fewer images than cores: single-threaded workers would then leave cores idle)
    on_workers = device.type == "cpu" and workers >= 2 and workers >= available_cores()
    if on_workers:
        # CPU, a loader worker per core: each worker decodes AND fuses whole images with one thread (forked
        # workers must stay single-threaded: OpenMP is not fork-safe). Small CAM ops scale poorly over
        # intra-op threads, whose barriers also stall for a scheduler tick whenever another process takes a
        # core: on 2 shared cores this ran 1.3x faster when lightly loaded and 3-10x faster under load with
        # the default OpenMP wait policy. Outputs are the same. A deep prefetch lets a worker run ahead.
        logger.info("CPU: %d loader workers fuse whole images (one thread each)", workers)
        dataset = _FusedDataset(dataset, fuse)
    prefetch = (8 if on_workers else 4) if workers else None
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate_single,
                        pin_memory=device.type == "cuda", prefetch_factor=prefetch)
    with AsyncWriter(threads=2, max_pending=16) as writer:
        for item in tqdm(loader, total=len(todo), desc=desc, disable=not dist.is_main(), dynamic_ncols=True):
            out = item if on_workers else fuse(item)
            maps_np, label_np = out["maps"].numpy(), out["label"].numpy()
            writer.submit(_write_outputs, out_dir, out["id"], out["classes"], maps_np, label_np, out["stats"])
            if out["image"] is not None:
                writer.submit(_write_overlay, out_dir, out["id"], out["image"], maps_np, label_np)
    return len(todo)


class _SampleFuser:
    """One :class:`~smaf.data.voc.InferenceDataset` sample -> everything the writer needs (CPU tensors):
    ``{id, classes, maps, label, stats (prototypes) or None, image (overlay ids) or None}``."""

    def __init__(self, model, fus, amp: str, bg_rule: BackgroundRule, num_classes: int, prototypes: bool,
                 overlay_ids: set):
        self.model, self.fus, self.amp, self.bg_rule = model, fus, amp, bg_rule
        self.num_classes, self.prototypes, self.overlay_ids = num_classes, prototypes, overlay_ids

    def __call__(self, sample: dict) -> dict:
        fus, image = self.fus, sample["image"]
        result = fuse_image(self.model, sample["scaled"], sample["labels"], image.shape[:2], flip=fus.flip,
                            amp=self.amp, channels_last=fus.channels_last, with_feature=self.prototypes,
                            scales=fus.scales)
        label = label_from_maps(result, self.bg_rule(result.maps))
        stats = (class_feature_means(result.feature, label, self.num_classes, fus.prototype_min_pixels)
                 if self.prototypes else None)
        return {"id": sample["id"], "classes": result.classes, "maps": result.maps.cpu(), "label": label.cpu(),
                "stats": stats, "image": image if sample["id"] in self.overlay_ids else None}


class _FusedDataset(Dataset):
    """Items of ``dataset`` fused by ``fuse`` (a :class:`_SampleFuser`) inside the loader worker."""

    def __init__(self, dataset, fuse: _SampleFuser):
        self.dataset, self.fuse = dataset, fuse

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.fuse(self.dataset[index])


def aggregate_prototypes(out_dir: Path, ids: list, num_classes: int, feat_dim: int) -> tuple:
    """Prototype k = mean over images of the image's mean feature over pixels assigned to k
    (``proto_stats/<id>.npy``). Returns ((C+1, D) float32 tensor, (C+1,) image counts)."""
    sums = torch.zeros(num_classes + 1, feat_dim, dtype=torch.float64)
    counts = torch.zeros(num_classes + 1, dtype=torch.long)
    from ..io import load_cam_dict

    for image_id in ids:
        for k, v in load_cam_dict(out_dir / "proto_stats" / f"{image_id}.npy").items():
            sums[k] += torch.from_numpy(v).double()
            counts[k] += 1
    protos = (sums / counts.clamp(min=1).unsqueeze(1)).float()
    return protos, counts


def background_score_stats(npy_dir: Path, ids: list, bg_rule: BackgroundRule) -> dict:
    """The background scores ``bg_rule`` gives the saved fused maps ``<npy_dir>/<id>.npy`` of ``ids`` (the
    scores their PNGs were made with): ``{method, median, p10, p90, fallback_images}``."""
    from ..io import load_cam_dict

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


def evaluate_outputs(cfg, layout, out_dir: Path, subfolder: str, eval_ids: list, logger, done_ids: set,
                     name: str | None = None, bg_rule: BackgroundRule | None = None) -> dict | None:
    """mIoU of ``<out_dir>/<subfolder>/*.png`` on ``eval_ids`` when masks exist and every id was produced.
    With a per-image ``bg_rule``, the report also gives the spread of the background scores used
    (``bg_scores``, see :func:`background_score_stats`)."""
    from ..evaluate import evaluate_folder, write_report
    from ..metrics import format_table

    if not layout.has_masks(eval_ids):
        logger.info("no ground-truth masks for the evaluation list: evaluation skipped")
        return None
    missing = [i for i in eval_ids if i not in done_ids]
    if missing:
        logger.info("evaluation skipped: %d ids of the evaluation list were not generated (e.g. %s)",
                    len(missing), missing[0])
        return None
    result = evaluate_folder(out_dir / subfolder, layout.mask_dir, eval_ids,
                             ["background"] + layout.class_names, desc=f"eval {subfolder}")
    if bg_rule is not None:
        result["bg_threshold"] = bg_rule.report_value
        if bg_rule.method != "fixed":
            stats = background_score_stats(out_dir / "cam_npy", eval_ids, bg_rule)
            result["bg_scores"] = stats
            logger.info("background scores (%s): median %.3f, 10-90%% %.3f-%.3f, %d images at the fallback",
                        bg_rule, stats["median"], stats["p10"], stats["p90"], stats["fallback_images"])
    write_report(result, out_dir / "eval", name or subfolder)
    logger.info("%s", format_table(result, title=f"{out_dir.name}/{subfolder} on {len(eval_ids)} images"))
    return result


def run(cfg) -> dict:
    """Stage 1. Returns {'miou': float or None, 'out_dir': Path, 'num_images': int, 'bg_scores': the spread of
    per-image background scores (see :func:`background_score_stats`) or None}."""
    fus = cfg.fusion
    out_dir, logger, device, layout = prepare_output(cfg, fus.out_subdir, "gen_fusion")
    bg_rule = BackgroundRule.from_section(fus, "fusion")   # a bad rule fails before the model is loaded
    ids = layout.read_list(pick(fus.list, cfg.data.train_list))
    eval_ids = layout.read_list(pick(fus.eval_list, cfg.data.infer_list))
    ckpt = pick(fus.checkpoint, str(Path(cfg.work_dir) / "train_cls" / "final.pth"))
    model, meta = load_model(ckpt, producer="stage 0 (bash script/train_cls.sh)", device=device)
    logger.info("model %s/%s from %s | %d images | scales %s flip %s", meta["backbone"], meta["head"], ckpt,
                len(ids), list(fus.scales), fus.flip)
    logger.info("background score: %s", bg_rule)
    generate_fused_outputs(cfg, model, layout, ids, out_dir, device, logger, bg_rule, fus.overlays,
                           prototypes=True, desc="fusion")
    dist.barrier()
    result = {"out_dir": out_dir, "num_images": len(ids), "miou": None}
    if dist.is_main():
        protos, counts = aggregate_prototypes(out_dir, ids, layout.num_classes, meta["feat_dim"])
        payload = {"prototypes": protos, "image_counts": counts, "class_names": layout.class_names + ["background"]}
        atomic_save(out_dir / "prototypes.pt", lambda tmp: torch.save(payload, tmp))
        empty = [n for n, c in zip(layout.class_names + ["background"], counts.tolist()) if c == 0]
        logger.info("prototypes (%d x %d) -> %s%s", protos.shape[0], protos.shape[1], out_dir / "prototypes.pt",
                    f"; no image contributed to: {', '.join(empty)}" if empty else "")
        evaluation = evaluate_outputs(cfg, layout, out_dir, "cam_png", eval_ids, logger, set(ids), bg_rule=bg_rule)
        result["miou"] = evaluation["miou"] if evaluation else None
        result["bg_scores"] = evaluation.get("bg_scores") if evaluation else None
    dist.barrier()
    return result


def main(argv=None):
    from .common import stage_main

    stage_main(run, "Stage 1: multi-scale attention fusion (fused CAMs, PNGs, prototypes).", argv)


if __name__ == "__main__":
    main()
