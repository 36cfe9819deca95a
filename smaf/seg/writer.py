"""Label PNGs of a segmentation network for a list of images (stage 4 inference and ``python -m smaf.predict``):
one code path, resumable.

Per image ``name`` (a dataset id or a file's stem)::

    <png_dir>/<name>.png      argmax of the multi-scale x flip averaged probabilities (palette PNG, VOC numbering,
                              at the image's own size)
    <crf_dir>/<name>.png      with a CRF: argmax of the dense-CRF marginals of those probabilities
                              (:func:`smaf.refine.crf.crf_refine_scores`, DeepLab's constants by default)
    <overlay_dir>/<name>.jpg  for the chosen names: image | prediction (| + CRF) | the classes found

An image whose outputs all exist is skipped, and every file is written atomically, so an interrupted run
resumes. The CRF runs in a process pool fed while the network works on the next images (at most two images
per worker wait), so the device never waits for it.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import dist
from ..io import VOC_COLORMAP, AsyncWriter, overlay, save_label_png, save_panel
from ..refine.crf import CRFParams, crf_refine_scores
from ..runtime import default_workers
from .inference import SegImageDataset, collate_list, segment_batch

#: The dense-CRF constants of DeepLab-v2 for VOC (deeplab-public-ver2 test scripts; kazuto1011/deeplab-pytorch
#: configs/voc12.yaml): Gaussian sxy 1 weight 3, bilateral sxy 67 srgb 3 weight 4, 10 mean-field iterations.
DEEPLAB_CRF = CRFParams(gt_prob=0.7, gauss_sxy=1, gauss_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4, iterations=10)
PANEL_HEIGHT = 200


@dataclass
class SegOutputs:
    """Where :func:`segment_items` writes: label PNGs, CRF PNGs (None = no CRF), overlays (None = none)."""

    png_dir: Path
    crf_dir: Path | None = None
    overlay_dir: Path | None = None

    def done(self, name: str) -> bool:
        """Whether every output of ``name`` exists (overlays are not required)."""
        return (Path(self.png_dir) / f"{name}.png").is_file() and (
            self.crf_dir is None or (Path(self.crf_dir) / f"{name}.png").is_file())


def legend_tile(label: np.ndarray, class_names, height: int = PANEL_HEIGHT) -> np.ndarray:
    """An RGB tile listing the classes present in ``label`` (uint8 (H, W), VOC numbering) with their colours and
    share of the pixels: uint8 (height, 180, 3)."""
    import cv2

    names = ["background"] + list(class_names or [])
    values, counts = np.unique(label, return_counts=True)
    total = max(int(counts.sum()), 1)
    tile = np.full((height, 180, 3), 255, np.uint8)
    rows = [(int(v), int(c)) for v, c in zip(values, counts) if v != 255]
    rows.sort(key=lambda r: -r[1])
    y = 24   # below the panel's caption bar
    for value, count in rows[: max(1, (height - 24) // 18)]:
        colour = tuple(int(c) for c in VOC_COLORMAP[value])
        cv2.rectangle(tile, (6, y), (20, y + 12), colour, -1)
        cv2.rectangle(tile, (6, y), (20, y + 12), (60, 60, 60), 1)
        name = names[value] if value < len(names) else f"class {value}"
        cv2.putText(tile, f"{name[:16]} {100 * count / total:.0f}%", (26, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (30, 30, 30), 1, cv2.LINE_AA)
        y += 18
    return tile


def _write_overlay(path: Path, image: np.ndarray, label: np.ndarray, crf_label, class_names) -> None:
    tiles, titles = [image, overlay(image, label=label)], ["image", "prediction"]
    if crf_label is not None:
        tiles.append(overlay(image, label=crf_label))
        titles.append("prediction + CRF")
    tiles.append(legend_tile(crf_label if crf_label is not None else label, class_names))
    titles.append("classes")
    save_panel(path, tiles, titles, height=PANEL_HEIGHT)


def _crf_job(job: tuple) -> str:
    """Dense CRF of one image's probabilities, then its PNG (and overlay): runs in a pool worker."""
    name, image, probs, params, crf_path, overlay_path, label, class_names = job
    marginals = crf_refine_scores(image, probs, params)
    refined = marginals.argmax(0).astype(np.uint8)
    save_label_png(crf_path, refined)
    if overlay_path:
        _write_overlay(Path(overlay_path), image, label, refined, class_names)
    return name


def _init_crf_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


class _CRFRunner:
    """Feeds CRF jobs to a pool of ``workers`` processes (1 = in this process), at most ``2 * workers`` waiting."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.pool = None
        self.pending: list = []
        self.waited = 0.0   # seconds the caller spent waiting for the CRF (in-process CRF included)
        if self.workers > 1:
            ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_crf_worker)

    def submit(self, job: tuple) -> None:
        start = time.perf_counter()
        if self.pool is None:
            _crf_job(job)
        else:
            while len(self.pending) >= 2 * self.workers:
                self.pending.pop(0).get()
            self.pending.append(self.pool.apply_async(_crf_job, (job,)))
        self.waited += time.perf_counter() - start

    def close(self) -> None:
        try:
            for result in self.pending:
                result.get()
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.close()
                self.pool.join()
                self.pool = None

    def terminate(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def segment_items(model, items: list, outputs: SegOutputs, device, logger, scales=(1.0,), flip: bool = True,
                  base_long: int = 0, resize: str = "cv2", amp: str = "none", num_workers: int = 0,
                  batch_size: int = 1, crf_params: CRFParams | None = None, crf_workers: int = 1,
                  overlay_names=(), class_names=None, desc: str = "segment") -> dict:
    """Write the outputs of :class:`SegOutputs` for ``items`` (``(name, image path)`` pairs; this process's
    share: shard them first under torchrun).

    Args:
        model: a segmentation network on ``device`` in eval mode (an inference copy, see
            :func:`smaf.models.fold.inference_copy`, is the fast choice).
        scales, flip, base_long, resize: the inference inputs (:func:`smaf.seg.inference.segment_batch`,
            :class:`smaf.seg.inference.SegImageDataset`).
        amp: autocast of the forward passes; num_workers: DataLoader workers (decoding, resizing);
            batch_size: images per loader batch (same-size inputs share a forward pass).
        crf_params: the dense-CRF constants when ``outputs.crf_dir`` is set (default :data:`DEEPLAB_CRF`);
            crf_workers: its process pool (1 = in this process).
        overlay_names: names that get an overlay picture (when ``outputs.overlay_dir`` is set).
        class_names: the C foreground names (overlay legends).

    Returns ``{'images': segmented now, 'skipped': already finished, 'network_seconds': wall time of loading,
    inference and PNG writes (the time spent waiting for the CRF left out), 'seconds': wall time in all (CRF
    included), 'images_per_s': images / network seconds}``.
    """
    todo = [(n, p) for n, p in items if not outputs.done(n)]
    result = {"images": len(todo), "skipped": len(items) - len(todo), "network_seconds": 0.0, "seconds": 0.0,
              "images_per_s": None}
    if result["skipped"]:
        logger.info("%d of %d images already done (skipped)", result["skipped"], len(items))
    if not todo:
        return result
    for folder in (outputs.png_dir, outputs.crf_dir, outputs.overlay_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    params = crf_params or DEEPLAB_CRF
    overlay_names = set(overlay_names) if outputs.overlay_dir is not None else set()
    dataset = SegImageDataset(todo, scales=scales, base_long=base_long, resize=resize)
    workers = min(default_workers(num_workers), len(todo))
    loader = DataLoader(dataset, batch_size=max(1, int(batch_size)), num_workers=workers, collate_fn=collate_list,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    crf = _CRFRunner(crf_workers) if outputs.crf_dir is not None else None
    ok = False
    try:
        with AsyncWriter(threads=2, max_pending=16) as writer, \
                tqdm(total=len(todo), desc=desc, disable=not dist.is_main(), dynamic_ncols=True, unit="img") as bar:
            for batch in loader:
                probs = segment_batch(model, [s["scaled"] for s in batch], [s["image"].shape[:2] for s in batch],
                                      flip=flip, amp=amp)
                for sample, p in zip(batch, probs):
                    name, image = sample["id"], sample["image"]
                    label = p.argmax(0).to(torch.uint8).cpu().numpy()
                    writer.submit(save_label_png, Path(outputs.png_dir) / f"{name}.png", label)
                    wants_overlay = name in overlay_names
                    overlay_path = str(Path(outputs.overlay_dir) / f"{name}.jpg") if wants_overlay else ""
                    if crf is not None:
                        crf.submit((name, image, p.cpu().numpy(), params, str(Path(outputs.crf_dir) / f"{name}.png"),
                                    overlay_path, label, class_names))
                    elif wants_overlay:
                        writer.submit(_write_overlay, Path(overlay_path), image, label, None, class_names)
                    bar.update(1)
        result["network_seconds"] = time.perf_counter() - start - (crf.waited if crf is not None else 0.0)
        if crf is not None:
            crf.close()
        ok = True
    finally:
        if crf is not None and not ok:
            crf.terminate()
    result["seconds"] = time.perf_counter() - start
    result["images_per_s"] = len(todo) / max(result["network_seconds"], 1e-9)
    return result
