"""Refinement of a folder of per-image inputs by any per-image refiner, in a process pool.

A refiner is a picklable callable ``refiner(image, input, labelled) -> uint8 (H, W) label map`` with
``input_kind`` (``"png"``: the input is a label map read from ``<id>.png``; ``"npy"``: a CAM dict
``{class: HxW}`` read from ``<id>.npy``) and a short ``name`` (used for overlay file names); ``labelled`` is
the image's list of labelled class indices (0..C-1). :mod:`smaf.refine.crf` has the dense-CRF refiners,
:mod:`smaf.refine.par` PAR, :mod:`smaf.refine.random_walk` the random walk and :mod:`smaf.refine.a2gnn` A2GNN's
graph refinement.

A refiner of score maps may also define ``refine_scores(image, input, labelled) -> (label map, {class: HxW
float32})``: :func:`refine_folder` given ``npy_dir`` then calls it and writes the refined CAM dict as
``npy_dir/<id>.npy`` (before the PNG, whose presence marks the image finished). Refiners without it, and calls
without ``npy_dir``, work as before.

Workers read their own inputs and write their own outputs, so the parent holds only ids and memory stays
bounded whatever the list length. Finished outputs are skipped.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import dist
from ..io import (image_area, load_cam_dict, load_image, load_label_png, overlay, save_cam_dict, save_label_png,
                  save_panel)
from ..run_layout import OVERLAYS

_WORKER: dict = {}


def _init_worker(state: dict) -> None:
    # Each worker runs one single-threaded refinement; extra BLAS/OpenMP threads would only oversubscribe.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        # Torch refiners (PAR) in a forked worker: a parent that ran multi-threaded ops leaves an OpenMP pool the
        # child cannot use (its first parallel region deadlocks); one thread runs every op inline.
        sys.modules["torch"].set_num_threads(1)
    _WORKER.update(state)


def _read_input(kind: str, input_dir: Path, image_id: str):
    if kind == "png":
        return load_label_png(input_dir / f"{image_id}.png")
    return load_cam_dict(input_dir / f"{image_id}.npy")


def _input_label(kind: str, data) -> np.ndarray | None:
    """The input as a label map for the overlay (None for score inputs)."""
    return data if kind == "png" else None


def _refine_one(image_id: str) -> str:
    s = _WORKER
    refiner = s["refiner"]
    data = _read_input(refiner.input_kind, Path(s["input_dir"]), image_id)
    image = load_image(s["image_paths"][image_id])
    labelled = s["labelled"].get(image_id, [])
    if s.get("npy_dir"):
        refined, scores = refiner.refine_scores(image, data, labelled)
        save_cam_dict(Path(s["npy_dir"]) / f"{image_id}.npy", scores)
    else:
        refined = refiner(image, data, labelled)
    save_label_png(Path(s["output_dir"]) / f"{image_id}.png", refined)
    if image_id in s["overlay_ids"]:
        before = _input_label(refiner.input_kind, data)
        tiles = [image] + ([overlay(image, label=before)] if before is not None else []) + [overlay(image, label=refined)]
        titles = ["image"] + (["mask"] if before is not None else []) + [f"mask + {refiner.name.upper()}"]
        save_panel(Path(s["output_dir"]).parent / OVERLAYS / f"{image_id}_{refiner.name}.jpg", tiles, titles)
    return image_id


def return_free_heap_to_os() -> None:
    """glibc keeps freed heap memory mapped (allocator caches of earlier models and batches); forking a process
    copies the page tables of all of it. ``malloc_trim(0)`` unmaps the free part: after the benchmark's fusion
    section RSS fell from 1.24 to 0.34 GB and starting + stopping a pool of 2 from 0.095 to 0.035 s. A no-op
    where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def refine_folder(layout, input_dir: Path, output_dir: Path, ids: list, refiner, workers: int,
                  overlay_ids=(), desc: str = "refine", npy_dir: Path | None = None) -> int:
    """Refine ``input_dir/<id>.<png|npy>`` for ``ids`` into ``output_dir/<id>.png`` with ``refiner`` (see the
    module docstring) in a pool of ``workers`` processes (1 = in this process; a pool takes the largest images
    first). With ``npy_dir``, the refined score dicts go to ``npy_dir/<id>.npy`` too (the refiner needs
    ``refine_scores``). Returns the number of images refined (finished ones are skipped)."""
    if npy_dir is not None and not hasattr(refiner, "refine_scores"):
        raise ValueError(f"refiner '{getattr(refiner, 'name', refiner)}' writes label maps only (no refine_scores): "
                         f"call refine_folder without npy_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in ids if not (output_dir / f"{i}.png").is_file()
            or (npy_dir is not None and not (Path(npy_dir) / f"{i}.npy").is_file())]
    if not todo:
        return 0
    if npy_dir is not None:
        Path(npy_dir).mkdir(parents=True, exist_ok=True)
    state = {"input_dir": str(input_dir), "output_dir": str(output_dir), "refiner": refiner,
             "npy_dir": str(npy_dir) if npy_dir is not None else "",
             "image_paths": {i: str(layout.image_path(i)) for i in todo},
             "labelled": {i: np.nonzero(layout.labels[i] > 0.5)[0].tolist() for i in todo if i in layout.labels},
             "overlay_ids": set(overlay_ids)}
    bar = tqdm(total=len(todo), desc=desc, dynamic_ncols=True, disable=not dist.is_main())
    if workers <= 1:
        _init_worker(state)
        for image_id in todo:
            _refine_one(image_id)
            bar.update(1)
    else:
        # Largest images first (a CRF's cost grows with the pixels): the last images handed out are then the
        # small ones, so no worker is left finishing a large image alone while the others idle.
        todo.sort(key=lambda i: image_area(state["image_paths"][i]), reverse=True)
        return_free_heap_to_os()   # a smaller parent forks faster
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
            # imap_unordered streams ids to the workers and results back one by one; single-id chunks keep the
            # tail short (a CRF takes ~0.25 s, far more than handing out an id), so no worker idles at the end
            # while another still holds a chunk of several images.
            for _ in pool.imap_unordered(_refine_one, todo, chunksize=1):
                bar.update(1)
    bar.close()
    return len(todo)


def cam_folder_ids(layout, input_dir: Path, list_path: str, key: str, producer: str) -> list:
    """The ids a refinement step works on: those of the split list ``list_path`` (checked to have their
    ``<id>.npy`` in ``input_dir``) or, when it is '', every ``<id>.npy`` in ``input_dir``. ``key`` (the config key
    of the folder, e.g. ``par.input_dir``) and ``producer`` (how to make the folder) go into the one-line errors
    (:class:`~smaf.runtime.StageError`)."""
    from ..runtime import StageError

    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise StageError(f"CAM folder '{input_dir}' not found: run {producer} first or set {key}")
    if list_path:
        ids = layout.read_list(list_path)
        missing = [i for i in ids if not (input_dir / f"{i}.npy").is_file()]
        if missing:
            raise StageError(f"{len(missing)} of {len(ids)} CAM dicts of '{list_path}' are missing in '{input_dir}' "
                             f"(first: {missing[0]}.npy): make them first or use another list")
        return ids
    ids = sorted(p.stem for p in input_dir.glob("*.npy"))
    if not ids:
        raise StageError(f"no CAM .npy dicts in '{input_dir}': run {producer} first or set {key}")
    return ids


def stack_cam_maps(cams: dict, keys: list, image_size: tuple, device=None):
    """The maps of a CAM dict ``{c: (H, W)}`` for ``keys``, stacked as float32 (len(keys), H, W): a NumPy array
    when ``device`` is None, else a tensor on ``device``; a dict not at ``image_size`` = (H, W) is a ValueError
    saying the dicts must be at image size."""
    maps = np.stack([np.asarray(cams[k], np.float32) for k in keys])
    if maps.shape[1:] != tuple(image_size):
        raise ValueError(f"CAM maps are {tuple(maps.shape[1:])} but the image is {tuple(image_size)}: the .npy "
                         f"dicts must be at image size (as stage 1 writes them)")
    if device is None:
        return maps
    import torch

    return torch.from_numpy(maps).to(device)
