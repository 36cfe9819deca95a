"""Fused-map outputs of a CAM network over an id list (stages 1 and 3 and the speed benchmark): one code path.

Per image, under ``out_dir``::

    cam_npy/<id>.npy      CAM dict {class: HxW float32} of the labelled classes (the fused maps M)
    cam_png/<id>.png      argmax over [background score; M], VOC numbering (written last: marks the image done)
    proto_stats/<id>.npy  per-class mean feature f (when prototypes are asked for)
    overlays/<id>.jpg     image | fused attention | label, for the first N images

With ``single_dir`` the same files of the single-scale CAM (the unflipped scale-1.0 pass alone, :func:`fuse_image`'s
``single``) go under ``single_dir`` from the same forward passes.

Finished images are skipped (every file is written atomically), so an interrupted run resumes. Under torchrun
each rank takes its share of the list.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import dist
from ..data.voc import InferenceDataset, collate_single
from ..io import AsyncWriter, overlay, save_cam_dict, save_label_png, save_panel
from ..models.fold import inference_copy
from ..run_layout import CAM_NPY, CAM_PNG, OVERLAYS, PROTO_STATS
from ..runtime import available_cores, default_workers
from .background import BackgroundRule, label_from_maps
from .fusion import FusedResult, fuse_image
from .prototypes import class_feature_means


def _write_outputs(out_dir: Path, image_id: str, classes: list, maps: np.ndarray, label: np.ndarray,
                   proto_stats: dict | None) -> None:
    # The PNG is written last: its presence marks the image as finished for resume.
    save_cam_dict(out_dir / CAM_NPY / f"{image_id}.npy", {c: maps[i] for i, c in enumerate(classes)})
    if proto_stats is not None:
        save_cam_dict(out_dir / PROTO_STATS / f"{image_id}.npy", {k: v.numpy() for k, v in proto_stats.items()})
    save_label_png(out_dir / CAM_PNG / f"{image_id}.png", label)


def _write_overlay(out_dir: Path, image_id: str, image: np.ndarray, maps: np.ndarray, label: np.ndarray) -> None:
    heat = maps.max(0) if len(maps) else np.zeros(image.shape[:2], np.float32)
    save_panel(out_dir / OVERLAYS / f"{image_id}.jpg",
               [image, overlay(image, heat=heat), overlay(image, label=label)],
               ["image", "fused attention", "label (bg thr)"])


def is_finished(out_dir: Path, image_id: str, prototypes: bool) -> bool:
    done = (out_dir / CAM_PNG / f"{image_id}.png").is_file() and (out_dir / CAM_NPY / f"{image_id}.npy").is_file()
    return done and (not prototypes or (out_dir / PROTO_STATS / f"{image_id}.npy").is_file())


def single_scale_index(scales) -> int:
    """Index of scale 1.0 in ``scales`` (the pass that is the single-scale CAM); ValueError when it is absent."""
    values = [float(v) for v in scales]
    if 1.0 not in values:
        raise ValueError(f"the single-scale CAM is the scale-1.0 pass, and inference.scales {values} has none")
    return values.index(1.0)


def generate_fused_outputs(model, layout, ids: list, out_dir: Path, device, logger, inference, bg_rule: BackgroundRule,
                           amp: str = "none", num_workers: int = 0, num_overlays: int = 0,
                           prototype_min_pixels: int = 0, desc: str = "fusion", single_dir: Path | None = None) -> int:
    """Write ``cam_npy/``, ``cam_png/`` (and ``proto_stats/`` when ``prototype_min_pixels`` > 0) under
    ``out_dir`` for this rank's share of ``ids``.

    Args:
        model: a CAM network (``forward -> (logits, cam, f)``, ``has_background``); an inference copy is used.
        inference: the ``inference`` config section (scales, flip, base_long, resize, channels_last).
        bg_rule: each image's background score for the PNG (and so for the prototypes).
        amp / num_workers: the config's ``amp`` and ``num_workers``.
        num_overlays: overlay pictures for the first N ids.
        prototype_min_pixels: > 0 also writes per-image class-mean features of classes with at least that many
            feature pixels (:func:`smaf.cam.prototypes.class_feature_means`).
        single_dir: also write the single-scale CAM's files there (``inference.scales`` must hold 1.0); an image
            counts as finished when both folders have it.

    Returns the number of images processed (skipped finished ones excluded)."""
    fus = inference
    prototypes = prototype_min_pixels > 0
    model, note = inference_copy(model, device)   # the same maps, fewer passes over activations
    if note:
        logger.info("%s", note)
    if fus.channels_last and device.type == "cuda":
        # (weights the copy shares with the caller's model change layout in place: same values)
        model = model.to(memory_format=torch.channels_last)
    overlay_ids = set(ids[:num_overlays])
    mine = dist.shard(ids)
    single_index = single_scale_index(fus.scales) if single_dir is not None else None
    folders = [out_dir] + ([single_dir] if single_dir is not None else [])
    todo = [i for i in mine if not all(is_finished(d, i, prototypes) for d in folders)]
    if len(todo) < len(mine):
        logger.info("%d of %d images already done (skipped)", len(mine) - len(todo), len(mine))
    if not todo:
        return 0
    for folder in folders:
        for sub in (CAM_NPY, CAM_PNG) + ((PROTO_STATS,) if prototypes else ()):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    dataset = InferenceDataset(layout, todo, scales=fus.scales, base_long=fus.base_long,
                               resize=fus.get("resize", "cv2"))
    workers = min(default_workers(num_workers), len(todo))   # no worker without an image to load
    fuse = _SampleFuser(model, fus, amp, bg_rule, layout.num_classes, prototype_min_pixels, overlay_ids, single_index)
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
            for folder, key in zip(folders, ("", "single_")):
                maps_np, label_np = out[key + "maps"].numpy(), out[key + "label"].numpy()
                writer.submit(_write_outputs, folder, out["id"], out["classes"], maps_np, label_np, out[key + "stats"])
                if out["image"] is not None:
                    writer.submit(_write_overlay, folder, out["id"], out["image"], maps_np, label_np)
    return len(todo)


class _SampleFuser:
    """One :class:`~smaf.data.voc.InferenceDataset` sample -> everything the writer needs (CPU tensors):
    ``{id, classes, maps, label, stats (prototypes) or None, image (overlay ids) or None}``, and with
    ``single_index`` the single-scale CAM's ``single_maps``, ``single_label``, ``single_stats`` too."""

    def __init__(self, model, fus, amp: str, bg_rule: BackgroundRule, num_classes: int, prototype_min_pixels: int,
                 overlay_ids: set, single_index: int | None = None):
        self.model, self.fus, self.amp, self.bg_rule = model, fus, amp, bg_rule
        self.num_classes, self.overlay_ids, self.single_index = num_classes, overlay_ids, single_index
        self.min_pixels, self.prototypes = prototype_min_pixels, prototype_min_pixels > 0

    def _outputs(self, result, maps, prefix: str) -> dict:
        label = label_from_maps(FusedResult(result.classes, maps), self.bg_rule(maps))
        # the feature is that of the unflipped scale-1.0 pass, the one a single-scale run would use too
        stats = (class_feature_means(result.feature, label, self.num_classes, self.min_pixels)
                 if self.prototypes else None)
        return {prefix + "maps": maps.cpu(), prefix + "label": label.cpu(), prefix + "stats": stats}

    def __call__(self, sample: dict) -> dict:
        fus, image = self.fus, sample["image"]
        result = fuse_image(self.model, sample["scaled"], sample["labels"], image.shape[:2], flip=fus.flip,
                            amp=self.amp, channels_last=fus.channels_last, with_feature=self.prototypes,
                            scales=fus.scales, single_index=self.single_index)
        out = {"id": sample["id"], "classes": result.classes,
               "image": image if sample["id"] in self.overlay_ids else None, **self._outputs(result, result.maps, "")}
        if self.single_index is not None:
            out.update(self._outputs(result, result.single, "single_"))
        return out


class _FusedDataset(Dataset):
    """Items of ``dataset`` fused by ``fuse`` (a :class:`_SampleFuser`) inside the loader worker."""

    def __init__(self, dataset, fuse: _SampleFuser):
        self.dataset, self.fuse = dataset, fuse

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.fuse(self.dataset[index])
