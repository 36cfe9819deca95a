"""Speed of the affinity refiners: PAR (:mod:`smaf.refine.par`) and the AffinityNet random walk
(:mod:`smaf.refine.random_walk`), images/s on given images and CAM dicts, on any device.

:func:`bench_refiners` times, per image (median of ``repeats`` timed passes over all images, after one warm-up
pass; CUDA synchronised):

* ``par``: the whole PAR refinement of a CAM dict (:meth:`PARRefiner.refine_scores`: background score, PAR at
  ``scale``, resize back, argmax);
* ``rw_network``: the AffinityNet forward pass (:meth:`RandomWalkRefiner.features`);
* ``rw_walk``: the walk itself (:meth:`RandomWalkRefiner.walk`: pooling, sparse transition matrix, 2^logt
  products, upsampling, argmax), the part the issue's target is about ("random walk of one VOC-sized image
  under 50 ms on a GPU and under 2 s on this CPU");
* ``rw_total``: both.

:func:`synthetic_inputs` makes VOC-sized images (375 x 500) with random smooth CAM dicts when no real ones are
at hand. Nothing is written to disk.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

#: Targets of the random walk of one VOC-sized image (the walk, network excluded), seconds.
RW_TARGET_S = {"cuda": 0.050, "cpu": 2.0}
VOC_SIZE = (375, 500)


def synthetic_inputs(num_images: int = 4, size=VOC_SIZE, num_classes: int = 2, seed: int = 0):
    """``(images, cams)``: ``num_images`` RGB uint8 (H, W, 3) images of ``size`` (textured blobs) and CAM dicts
    ``{c: (H, W) float32 in [0, 1]}`` of ``num_classes`` classes (smooth random maps)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    images, cams = [], []
    for _ in range(num_images):
        image = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), (0, 0), 3)
        maps = {}
        for c in rng.choice(20, size=num_classes, replace=False).tolist():
            m = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 25)
            m -= m.min()
            maps[int(c)] = m / max(float(m.max()), 1e-5)
        images.append(image)
        cams.append(maps)
    return images, cams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_image_times(fn, items, repeats: int, device: torch.device) -> list[float]:
    """Seconds per image of ``fn(item)`` over ``items``: one warm-up pass, then ``repeats`` timed passes."""
    for item in items:
        fn(item)
    times = []
    for _ in range(max(1, int(repeats))):
        _sync(device)
        start = time.perf_counter()
        for item in items:
            fn(item)
        _sync(device)
        times.append((time.perf_counter() - start) / len(items))
    return times


def _summary(times: list[float]) -> dict:
    median = float(statistics.median(times))
    return {"seconds_per_image": median, "images_per_s": 1.0 / median if median > 0 else None,
            "times_s": [round(t, 5) for t in times]}


def bench_refiners(images: list, cams: list, device="auto", repeats: int = 3, par_params=None, rw_params=None,
                   affinity_model=None, backbone: str | None = None, bg_rule=None, base_long: int = 0) -> dict:
    """Images/s of PAR and of the random walk on ``images`` (RGB uint8 (H, W, 3)) with their CAM dicts ``cams``
    (``{c: (H, W)}``, image size).

    Args:
        device: 'auto' (CUDA when available), 'cpu', 'cuda' or a torch.device.
        repeats: timed passes (median reported).
        par_params: :class:`~smaf.refine.par.PARParams` (default AFA's: 6 dilations, 10 iterations, scale 0.5).
        rw_params: :class:`~smaf.refine.random_walk.RandomWalkParams` (default PSA's preset: beta 8, logt 8,
            power background alpha 16: the longest walk of the presets).
        affinity_model: a trained AffinityNet; None builds a randomly initialised one (the same cost) on
            ``backbone`` (None: ResNet-38 on CUDA, EfficientNet-Lite0 at output stride 16 on a CPU).
        bg_rule: the background rule of PAR (default fixed 0.2).
        base_long: the random walk's network input long side (0 = the image size).

    Returns ``{'device', 'num_images', 'image_sizes', 'torch_threads', 'par': {...}, 'rw_network': {...},
    'rw_walk': {...}, 'rw_total': {...}, 'rw_target_s', 'rw_pass', 'settings'}``; each timing dict holds
    ``seconds_per_image``, ``images_per_s`` and the per-pass ``times_s``. ``rw_pass`` compares the walk
    (network excluded) with the target for the device (:data:`RW_TARGET_S`); it is None unless every image
    is VOC-sized (375 x 500 or 500 x 375).
    """
    from ..cam.background import BackgroundRule
    from ..models.registry import build_from_spec
    from ..refine.par import PARParams, PARRefiner
    from ..refine.random_walk import RandomWalkParams, RandomWalkRefiner

    if len(images) != len(cams) or not images:
        raise ValueError(f"bench_refiners: give as many CAM dicts as images (got {len(images)} images, {len(cams)} "
                         f"dicts), at least one")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    par_params = par_params or PARParams()
    rw_params = rw_params or RandomWalkParams(beta=8.0, logt=8, bg="power", alpha=16.0)
    if affinity_model is None:
        backbone = backbone or ("resnet38d" if device.type == "cuda" else "efficientnet_lite0")
        torch.manual_seed(0)
        affinity_model = build_from_spec({"arch": "affinity_net", "args": {
            "backbone": backbone, "output_stride": 8 if backbone == "resnet38d" else 16}})
        weights = "random init (same cost)"
    else:
        backbone = backbone or getattr(affinity_model, "arch_spec", {}).get("args", {}).get("backbone", "?")
        weights = "given"
    rule = bg_rule or BackgroundRule()
    items = list(zip(images, cams))

    par = PARRefiner(par_params, rule, device)
    par_times = _per_image_times(lambda item: par.refine_scores(item[0], item[1], []), items, repeats, device)

    rw = RandomWalkRefiner(affinity_model, rw_params, rule, base_long, device)
    feats = {}

    def network(item):
        feats[id(item[0])] = rw.features(item[0])

    def walk(item):
        f, size = feats[id(item[0])]
        rw.walk(f, size, item[1], item[0].shape[:2])

    net_times = _per_image_times(network, items, repeats, device)
    walk_times = _per_image_times(walk, items, repeats, device)
    total_times = [a + b for a, b in zip(net_times, walk_times)]
    sizes = sorted({tuple(int(v) for v in im.shape[:2]) for im in images})
    voc_sized = all(s in (VOC_SIZE, VOC_SIZE[::-1]) for s in sizes)
    target = RW_TARGET_S.get(device.type)
    walk = _summary(walk_times)
    return {"device": str(device), "num_images": len(images), "image_sizes": [list(s) for s in sizes],
            "torch_threads": torch.get_num_threads(), "par": _summary(par_times), "rw_network": _summary(net_times),
            "rw_walk": walk, "rw_total": _summary(total_times), "rw_target_s": target,
            "rw_pass": bool(walk["seconds_per_image"] < target) if voc_sized and target else None,
            "settings": {"par": {"dilations": list(par_params.dilations), "iterations": par_params.iterations,
                                 "scale": par_params.scale},
                         "rw": {"beta": rw_params.beta, "logt": rw_params.logt, "bg": rw_params.bg,
                                "radius": rw_params.radius, "method": rw_params.method, "base_long": base_long,
                                "backbone": backbone, "weights": weights},
                         "classes_per_image": sorted({len(c) for c in cams})}}


def format_refiners(result: dict) -> str:
    """A few lines for the benchmark's text report."""
    def row(name, t):
        return f"  {name:<34} {t['images_per_s']:8.2f} im/s  ({1000 * t['seconds_per_image']:.1f} ms/image)"

    s = result["settings"]
    verdict = {None: "n/a (not VOC-sized)", True: "PASS", False: "MISS"}[result["rw_pass"]]
    return "\n".join([
        (f"refiners on {result['device']} ({result['torch_threads']} threads), {result['num_images']} images "
         f"{result['image_sizes']}, {s['classes_per_image']} classes per image"),
        row(f"PAR (scale {s['par']['scale']:g})", result["par"]),
        row(f"RW network ({s['rw']['backbone']})", result["rw_network"]),
        row(f"RW walk (t=2^{s['rw']['logt']})", result["rw_walk"]),
        row("RW total", result["rw_total"]),
        f"  RW walk target < {1000 * result['rw_target_s']:.0f} ms per VOC-sized image: {verdict}"
        if result["rw_target_s"] else ""]).rstrip()


#: A2GNN's graph of one VOC-sized image: the stride-8 grid of 375 x 500 (ceil) and EfficientNet-Lite0's node features.
A2GNN_GRID = (47, 63)
A2GNN_FEATURES = 1432


def bench_a2gnn(grid=A2GNN_GRID, device="auto", repeats: int = 3, epochs: int = 2, classes: int = 2) -> dict:
    """Speed of A2GNN's per-image training (:func:`smaf.models.a2gnn.train_graphs`) on one random graph of
    ``grid`` nodes (random features, seeds on half the pixels, ``classes`` foreground classes), image preset
    (window radius 3, hidden 256, 3 layers).

    Returns ``{'device', 'grid', 'epoch': {...}: seconds per training epoch (median over ``repeats`` runs of
    ``epochs`` epochs per phase, set-up and the final pass included, divided by 2 x epochs),
    'layer_windowed' / 'layer_stacked': forward + backward of one attention layer's window operations (cosines
    and aggregation over the 49 offsets at 256 channels) as :func:`~smaf.models.a2gnn.window_dots` /
    :func:`~smaf.models.a2gnn.window_aggregate` compute them and as a stack of every shifted copy
    (:func:`~smaf.models.a2gnn.neighbour_stack`, what the layer did before), 'layer_speedup': their ratio,
    'image_s_at_spec': the epoch time x 100 (the spec's 50 + 50 epochs of the image preset)}``."""
    from ..models.a2gnn import (GraphInput, TrainParams, collate_graphs, neighbour_stack, train_graphs,
                                window_aggregate, window_dots, window_offsets)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    h, w = grid
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    seeds = np.where(rng.random((h * 8, w * 8)) < 0.5, rng.integers(0, classes + 1, (h * 8, w * 8)), 255)
    graph = GraphInput(torch.rand(A2GNN_FEATURES, h, w, generator=gen), torch.rand(448, h, w, generator=gen),
                       seeds.astype(np.uint8), torch.rand(3, h, w, generator=gen), list(range(classes + 1)))
    batch = collate_graphs([graph], 3, 21, device)
    params = TrainParams(epochs=epochs)

    def train(_):
        train_graphs(batch, params)

    epoch_times = [t / (2 * epochs) for t in _per_image_times(train, [None], repeats, device)]
    offsets = window_offsets(3)
    x = torch.rand(1, 256, h, w, device=device, requires_grad=True)
    p = torch.rand(1, len(offsets), h, w, device=device, requires_grad=True)

    def windowed(_):
        (window_dots(x, x, offsets).sum() + window_aggregate(p, x, offsets).sum()).backward()

    def stacked(_):
        nb = neighbour_stack(x, offsets)
        ((x.unsqueeze(1) * nb).sum(2).sum() + (p.unsqueeze(2) * nb).sum(1).sum()).backward()

    forms = {"windowed": windowed, "stacked": stacked}
    layer_times = {name: [] for name in forms}
    for r in range(max(1, int(repeats))):          # rotate the order, so that a change of load hits both
        for name in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
            layer_times[name] += _per_image_times(forms[name], [None], 1, device)
    epoch = _summary(epoch_times)
    windowed_s = float(statistics.median(layer_times["windowed"]))
    stacked_s = float(statistics.median(layer_times["stacked"]))
    return {"device": str(device), "grid": [h, w], "torch_threads": torch.get_num_threads(), "epoch": epoch,
            "layer_windowed": _summary(layer_times["windowed"]), "layer_stacked": _summary(layer_times["stacked"]),
            "layer_speedup": stacked_s / windowed_s if windowed_s > 0 else None,
            "image_s_at_spec": 100 * epoch["seconds_per_image"]}


def format_a2gnn(result: dict) -> str:
    """A few lines for the benchmark's text report."""
    h, w = result["grid"]
    return "\n".join([
        f"A2GNN on {result['device']} ({result['torch_threads']} threads), one graph of {h} x {w} nodes",
        f"  training epoch (seed + gated-CRF losses)   {1000 * result['epoch']['seconds_per_image']:8.1f} ms"
        f"  (x 100 epochs, the spec's image preset: {result['image_s_at_spec']:.1f} s per image)",
        f"  window ops of one layer, fwd + bwd: windowed {1000 * result['layer_windowed']['seconds_per_image']:.1f} ms,"
        f" stacked shifts {1000 * result['layer_stacked']['seconds_per_image']:.1f} ms"
        f" (x{result['layer_speedup']:.1f})"])


if __name__ == "__main__":   # python -m smaf.bench.refine: VOC-sized synthetic inputs on the default device
    import json

    out = bench_refiners(*synthetic_inputs())
    print(format_refiners(out))
    print(json.dumps(out, indent=1))
