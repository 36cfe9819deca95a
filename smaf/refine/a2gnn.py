"""A2GNN refinement of seeds into pseudo masks with a trained AffinityNet (related-methods.md §8, stage 3): per
image, build the graph (:func:`graph_input`), train its network from scratch (:func:`smaf.models.a2gnn.
train_graphs`, several images at once), then softmax -> (+ 3 x the random-walk scores) -> dense CRF -> argmax.

Output of one image (:meth:`A2GNNRefiner.refine_batch`): the GNN's softmax on the stride-8 grid, upsampled
bilinearly x8, cropped to the network input and resized to the image, over [background; the image's classes].
With ``rw`` (image-level and point seeds in the reference), the random walk of the CAM maps (PSA walk with
A2GNN's constants: power background alpha 6, beta 8, logt 6; :class:`~smaf.refine.random_walk.RandomWalkRefiner`,
same AffinityNet features) is added with weight 3; the sum, divided by its per-pixel total, goes through the dense
CRF of A2GNN's final label (Gaussian sxy 2 compat 3, bilateral sxy 50 srgb 5 compat 10, 10 iterations; §1.5)
and is argmaxed.

The reference's ``--rw`` is a ``type=bool`` flag, always on whatever its value (§10); here ``rw`` is a real
switch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..models.a2gnn import GRAPH_STRIDE, GraphInput, TrainParams, collate_graphs, train_graphs
from .a2gnn_boxes import Box
from .a2gnn_seeds import SeedParams, confident_seeds, pad_seeds
from .crf import CRFParams, crf_refine_scores
from .random_walk import RandomWalkParams, RandomWalkRefiner, _normalized_image

#: A2GNN's final-label CRF (§1.5): Gaussian 2 / 3, bilateral 50 / 5 / 10, 10 iterations.
A2GNN_CRF = CRFParams(gt_prob=0.7, gauss_sxy=2, gauss_compat=3, bi_sxy=50, bi_srgb=5, bi_compat=10, iterations=10)
#: A2GNN's random walk of the CAM maps (§8): power background alpha 6, beta 8, logt 6.
A2GNN_RW = RandomWalkParams(beta=8.0, logt=6, bg="power", alpha=6.0)


@dataclass(frozen=True)
class A2GNNParams:
    """How a seed map becomes a pseudo mask (config ``a2gnn``; module docstring)."""

    train: TrainParams = TrainParams()
    rw: bool = True
    rw_weight: float = 3.0
    rw_params: RandomWalkParams = A2GNN_RW
    crf: bool = True
    crf_params: CRFParams = A2GNN_CRF
    base_long: int = 0
    seeds: SeedParams = field(default_factory=SeedParams)


def grid_boxes(boxes: list[Box], image_size: tuple, input_size: tuple, grid: tuple) -> list[tuple]:
    """Image boxes -> grid boxes (label c+1, y0, x0, y1, x1), inclusive, clipped to the grid."""
    (h, w), (hi, wi), (gh, gw) = image_size, input_size, grid
    sy, sx = hi / h / GRAPH_STRIDE, wi / w / GRAPH_STRIDE
    out = []
    for b in boxes:
        y0, x0 = min(gh - 1, int(b.y0 * sy)), min(gw - 1, int(b.x0 * sx))
        y1, x1 = min(gh - 1, max(y0, int(b.y1 * sy))), min(gw - 1, max(x0, int(b.x1 * sx)))
        out.append((b.cls + 1, y0, x0, y1, x1))
    return out


class A2GNNRefiner:
    """A2GNN over images with their CAM dicts and / or seeds, on ``device``; ``model`` a trained AffinityNet
    (:class:`~smaf.models.affinity.AffinityNet`). Also a per-image refiner of CAM ``.npy`` dicts (protocol of
    :mod:`smaf.refine.pool`; run it with ``workers=1``): seeds by :func:`~smaf.refine.a2gnn_seeds.confident_seeds`,
    one graph per call."""

    input_kind = "npy"
    name = "a2gnn"

    def __init__(self, model, params: A2GNNParams = A2GNNParams(), num_classes: int = 20, device="cpu", seed: int = 0):
        self.params, self.num_classes, self.seed = params, int(num_classes), int(seed)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.walker = RandomWalkRefiner(self.model, params.rw_params, base_long=params.base_long, device=self.device)

    @torch.no_grad()
    def graph_input(self, image: np.ndarray, seeds: np.ndarray, classes: list, boxes=()) -> tuple[GraphInput, dict]:
        """The graph of one image: RGB uint8 (H, W, 3), seeds uint8 (H, W), its classes (0..C-1), optional boxes
        -> (GraphInput, context for :meth:`finish`)."""
        h, w = image.shape[:2]
        if seeds.shape != (h, w):
            raise ValueError(f"seeds {seeds.shape} and image {(h, w)} sizes differ")
        x = _normalized_image(image, self.params.base_long, self.device)
        f, levels = self.model.forward_with_levels(x)
        hi, wi = x.shape[-2:]
        gh, gw = f.shape[-2:]
        if (hi, wi) != (h, w):
            seeds = cv2.resize(seeds, (wi, hi), interpolation=cv2.INTER_NEAREST)
        padded_size = (gh * GRAPH_STRIDE, gw * GRAPH_STRIDE)
        rgb = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None] / 255.0
        if (hi, wi) != (h, w):
            rgb = F.interpolate(rgb, size=(hi, wi), mode="bilinear", align_corners=False)
        rgb = F.pad(rgb, (0, padded_size[1] - wi, 0, padded_size[0] - hi))
        rgb = F.avg_pool2d(rgb, GRAPH_STRIDE)[0]
        graph = GraphInput(levels[0].float(), f[0].float(), pad_seeds(seeds, padded_size), rgb,
                           [0] + [c + 1 for c in sorted(classes)],
                           grid_boxes(list(boxes), (h, w), (hi, wi), (gh, gw)))
        return graph, {"f": f[0].float(), "input_size": (hi, wi), "image_size": (h, w), "grid": (gh, gw)}

    @torch.no_grad()
    def finish(self, image: np.ndarray, probs: torch.Tensor, context: dict, classes: list,
               cams: dict | None) -> tuple[np.ndarray, dict]:
        """One graph's softmax (C+1, h, w) (padded grid) -> (uint8 (H, W) label map, {c: score (H, W)})."""
        (gh, gw), (hi, wi), (h, w) = context["grid"], context["input_size"], context["image_size"]
        keys = sorted(classes)
        up = F.interpolate(probs[None, :, :gh, :gw], scale_factor=GRAPH_STRIDE, mode="bilinear",
                           align_corners=False)[..., :hi, :wi]
        if (hi, wi) != (h, w):
            up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
        scores = up[0, [0] + [k + 1 for k in keys]]
        if self.params.rw and cams:
            if sorted(cams) != keys:
                raise ValueError(f"the CAM dict has classes {sorted(cams)} but the seeds {keys}")
            scores = scores + self.params.rw_weight * self.walker.walk_scores(context["f"], (hi, wi), cams, (h, w))
        scores = (scores / scores.sum(0, keepdim=True).clamp(min=1e-12)).cpu().numpy()
        if self.params.crf and keys:
            scores = crf_refine_scores(image, scores, self.params.crf_params)
        lut = np.array([0] + [k + 1 for k in keys], np.uint8)
        return lut[scores.argmax(0)], {k: scores[i + 1] for i, k in enumerate(keys)}

    def refine_batch(self, items: list[dict]) -> tuple[list, dict]:
        """Train and apply A2GNN for several images at once. Each item: ``image`` RGB uint8 (H, W, 3), ``seeds``
        uint8 (H, W), ``classes`` (0..C-1), optional ``cams`` (for the random walk) and ``boxes`` (box variant:
        MIL loss and consistency check). Returns ([(label, scores) per item], training logs)."""
        graphs, contexts = zip(*[self.graph_input(it["image"], it["seeds"], it["classes"], it.get("boxes") or ())
                                 for it in items])
        batch = collate_graphs(list(graphs), self.params.train.window_radius, self.num_classes + 1, self.device)
        mil = any(it.get("boxes") for it in items)
        probs, logs = train_graphs(batch, self.params.train, self.seed, mil=mil)
        out = [self.finish(it["image"], probs[i], ctx, it["classes"], it.get("cams"))
               for i, (it, ctx) in enumerate(zip(items, contexts))]
        return out, logs

    def refine_scores(self, image: np.ndarray, cams: dict, labelled: list) -> tuple[np.ndarray, dict]:
        """Per-image refiner: seeds from the CAM dict, then A2GNN (one graph)."""
        if not cams:
            return np.zeros(image.shape[:2], np.uint8), {}
        seeds = confident_seeds(image, cams, self.params.seeds)
        (result,), _ = self.refine_batch([{"image": image, "seeds": seeds, "classes": sorted(cams), "cams": cams}])
        return result

    def __call__(self, image: np.ndarray, cams: dict, labelled: list) -> np.ndarray:
        return self.refine_scores(image, cams, labelled)[0]
