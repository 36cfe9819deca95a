"""A2GNN: the affinity-attention graph network trained from scratch for each image (related-methods.md §8, stage 3),
in batched, banded form (several graphs per step, no dense N x N matrix).

Graph of one image (:func:`graph_inputs`): the nodes are the stride-8 pixels (h x w grid of the AffinityNet); a
node's feature is the concatenation of the backbone's three feature levels on that grid (ResNet-38 conv4, conv5,
conv6: 512 + 1024 + 4096 = 5632; EfficientNet-Lite0: 40 + 112 + 1280 = 1432; :data:`~smaf.models.affinity.
BACKBONE_LEVELS`), each row L1-normalised. Edges join every node to the nodes of its square window of radius r
(|dy|, |dx| <= r; image-level / point seeds 3, box / scribble 4), itself included; the adjacency is the
AffinityNet affinity A_ij = exp(-mean_c |f_i - f_j|) (1 on the diagonal). Edge quantities are stored per offset:
(G, O, h, w) with O = (2r + 1)^2 offsets (:func:`window_offsets`), entry [g, o, y, x] for the edge from node
(y, x) to (y, x) + offset o of graph g.

Network (:class:`A2GNN`, one set of weights per graph): linear D -> 256 (no bias) + ReLU + dropout 0.5; three
affinity-attention layers (:class:`AffinityAttention`), each x_i <- sum_j P_ij x_j with
P = softmax_j(beta cos(x_i, x_j) + 10 A_ij + M_ij), M = -1e9 outside the window (or the grid) and where
cos(x_i, x_j) < 0, beta learnable (init U(0, 1)); linear 256 -> C + 1.

Training (:func:`train_graphs`): Adam, weight decay 5e-4, lr 0.03 (box 0.035); phase A, E epochs (50; box 150)
of the seed loss CE(background seeds) + CE(foreground seeds) on the logits upsampled bilinearly to image size
(seeds 255 = unlabelled and padding are left out); phase B, E more epochs with a gated-CRF loss added (weight
0.3; box 0.01), radius 5 on the grid, kernel exp(-|dxy|^2 / (2 * 6^2) - |drgb|^2 / (2 * 0.1^2)) (xy in image
pixels, rgb in [0, 1]), d_ij = 1 - <p_i, p_j>, divided by the number of pairs. Box supervision adds the MIL
loss (:func:`mil_loss`) in both phases and the consistency check (:func:`consistency_check`) between them.

The graphs of a batch are padded to a common grid; padding nodes are masked out of every edge and loss. Adam
works element-wise, so graphs trained together learn exactly as they would alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = 255
NEG_INF = -1e9
GRAPH_STRIDE = 8


def window_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of the square window |dy|, |dx| <= r, row-major, (0, 0) included: (2r + 1)^2."""
    r = int(radius)
    if r < 1:
        raise ValueError(f"window radius must be >= 1, got {radius}")
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def window_pad(offsets) -> int:
    """The padding a list of window offsets (dy, dx) needs: max |dy|, |dx|."""
    return max(max(abs(dy), abs(dx)) for dy, dx in offsets)


def shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, size: tuple[int, int]) -> torch.Tensor:
    """From a tensor padded by ``pad`` on both sides of its last two dims, the view y with y[..., i, j] =
    x[..., i + dy, j + dx] (the pad value outside x)."""
    h, w = size
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def neighbour_stack(x: torch.Tensor, offsets, fill: float = 0.0) -> torch.Tensor:
    """x (G, ..., h, w) -> (G, O, ..., h, w): x shifted by each offset (``fill`` outside the grid)."""
    pad = window_pad(offsets)
    size = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    return torch.stack([shifted(padded, pad, dy, dx, size) for dy, dx in offsets], 1)


# The window operations below run as batched matrix products over the rows of the grid: for one row offset dy,
# the nodes of row y (w x K, channels-last) against the padded row y + dy ((w + 2 pad) x K) give every pair of the
# two rows, and the window's dx offsets are diagonals of that product (or, the other way, the edge weights of
# one dy form a banded matrix). That is a few times the arithmetic of offset-by-offset products, but as GEMMs,
# which a CPU runs an order of magnitude faster than the strided element-wise products (measured:
# smaf.bench section e).
def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def _rows_by_dy(offsets) -> tuple[int, dict]:
    """(pad, {dy: [(index in offsets, dx), ...]}) of a list of window offsets."""
    pad = window_pad(offsets)
    rows: dict = {}
    for o, (dy, dx) in enumerate(offsets):
        rows.setdefault(dy, []).append((o, dx))
    return pad, rows


def _pad_rows(x_cl: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x_cl, (0, 0, pad, pad, pad, pad))                  # (G, h + 2 pad, w + 2 pad, K)


def _band(weights: torch.Tensor, entries, pad: int) -> torch.Tensor:
    """Banded (G, h, w, w + 2 pad) matrices of one row offset: [g, y, x, x + pad + dx] = weights[g, o, y, x]
    for the (o, dx) of ``entries``."""
    g, _, h, w = weights.shape
    band = weights.new_zeros(g, h, w, w + 2 * pad)
    for o, dx in entries:
        torch.diagonal(band, offset=pad + dx, dim1=-2, dim2=-1).copy_(weights[:, o])
    return band


def _dots(a: torch.Tensor, b: torch.Tensor, offsets) -> torch.Tensor:
    pad, rows = _rows_by_dy(offsets)
    h = a.shape[-2]
    a_cl = _channels_last(a)
    b_pad = _pad_rows(_channels_last(b), pad)
    out = a.new_empty(a.shape[0], len(offsets), *a.shape[-2:])
    for dy, entries in rows.items():
        pairs = torch.matmul(a_cl, b_pad[:, pad + dy:pad + dy + h].transpose(-1, -2))   # (G, h, w, w + 2 pad)
        for o, dx in entries:
            out[:, o] = torch.diagonal(pairs, offset=pad + dx, dim1=-2, dim2=-1)
    return out


def _aggregate(p: torch.Tensor, x: torch.Tensor, offsets) -> torch.Tensor:
    pad, rows = _rows_by_dy(offsets)
    h = x.shape[-2]
    x_pad = _pad_rows(_channels_last(x), pad)
    out = None
    for dy, entries in rows.items():
        part = torch.matmul(_band(p, entries, pad), x_pad[:, pad + dy:pad + dy + h])    # (G, h, w, K)
        out = part if out is None else out.add_(part)
    return _channels_first(out)


def _scatter(weights: torch.Tensor, values: torch.Tensor, offsets) -> torch.Tensor:
    """The adjoint of the shift: (G, K, h, w) with [i + o] += weights[:, o, i] * values[:, :, i], summed over o
    (weights (G, O, h, w), values (G, K, h, w)); accumulated in one padded buffer."""
    pad, rows = _rows_by_dy(offsets)
    h, w = values.shape[-2:]
    values_cl = _channels_last(values)
    buffer = _pad_rows(torch.zeros_like(values_cl), pad)
    for dy, entries in rows.items():
        buffer[:, pad + dy:pad + dy + h] += torch.matmul(_band(weights, entries, pad).transpose(-1, -2), values_cl)
    return _channels_first(buffer[:, pad:pad + h, pad:pad + w])


class _WindowDots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, offsets):
        ctx.save_for_backward(a, b)
        ctx.offsets = offsets
        return _dots(a, b, offsets)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        return _aggregate(grad, b, ctx.offsets), _scatter(grad, a, ctx.offsets), None


class _WindowAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, x, offsets):
        ctx.save_for_backward(p, x)
        ctx.offsets = offsets
        return _aggregate(p, x, offsets)

    @staticmethod
    def backward(ctx, grad):
        p, x = ctx.saved_tensors
        grad = grad.contiguous()
        return _dots(grad, x, ctx.offsets), _scatter(p, grad, ctx.offsets), None


def window_dots(a: torch.Tensor, b: torch.Tensor, offsets) -> torch.Tensor:
    """Dot products along every window edge: a, b (G, K, h, w) -> (G, O, h, w), [g, o, i] = <a_i, b_(i + o)>
    (0 where i + o is outside the grid). Differentiable in a and b, with backward passes written out (both
    directions are row-by-row matrix products, see the comment above :func:`_rows_by_dy`): a stack of every
    shifted copy (:func:`neighbour_stack`) holds O x K maps, and autograd through per-offset slices allocates a
    padded gradient per offset; either made one Pet-sized epoch (30 x 40 nodes, K = 256, O = 49) cost seconds on
    a CPU core."""
    return _WindowDots.apply(a, b, offsets)


def window_aggregate(p: torch.Tensor, x: torch.Tensor, offsets) -> torch.Tensor:
    """Edge weights times neighbour values, summed over the window: p (G, O, h, w), x (G, K, h, w) ->
    (G, K, h, w), [g, :, i] = sum_o p[g, o, i] x_(i + o) (x is 0 outside the grid). Differentiable in p and x;
    computed as :func:`window_dots`."""
    return _WindowAggregate.apply(p, x, offsets)


def window_mask(valid: torch.Tensor, offsets) -> torch.Tensor:
    """bool (G, O, h, w): node i and its neighbour i + o are both real nodes (valid (G, h, w) bool)."""
    nb = neighbour_stack(valid.float(), offsets, 0.0) > 0.5
    return nb & valid.unsqueeze(1)


def window_distances(f: torch.Tensor, offsets) -> torch.Tensor:
    """L1 feature distance of every window edge: f (G, D, h, w) -> (G, O, h, w), mean_c |f_i - f_j| (0 at offset
    (0, 0); values outside the grid are meaningless, masked by :func:`window_mask`). One offset at a time: a
    stack of every shifted copy would hold O x D maps."""
    pad = window_pad(offsets)
    size = f.shape[-2:]
    padded = F.pad(f, (pad, pad, pad, pad))
    return torch.stack([(f - shifted(padded, pad, dy, dx, size)).abs().mean(1) for dy, dx in offsets], 1)


def window_affinities(f: torch.Tensor, offsets) -> torch.Tensor:
    """AffinityNet affinities of every window edge: f (G, D, h, w) -> (G, O, h, w), exp(-mean_c |f_i - f_j|)
    (:func:`window_distances`; 1 at offset (0, 0))."""
    return torch.exp(-window_distances(f, offsets))


class AffinityAttention(nn.Module):
    """One affinity-attention layer for G graphs at once (module docstring): x (G, K, h, w) -> (G, K, h, w).

    ``forward(x, adjacency, window, offsets)`` with adjacency (G, O, h, w) the affinities A_ij, window (G, O, h, w)
    bool the window edges between real nodes. Rows without any allowed edge (padding nodes) give 0."""

    def __init__(self, num_graphs: int = 1, adjacency_weight: float = 10.0):
        super().__init__()
        self.beta = nn.Parameter(torch.rand(int(num_graphs)))
        self.adjacency_weight = float(adjacency_weight)

    def attention(self, x: torch.Tensor, adjacency: torch.Tensor, window: torch.Tensor, offsets) -> torch.Tensor:
        """P (G, O, h, w): P[g, o, i] = the weight of edge i -> i + o (each row sums to 1 over o)."""
        xn = F.normalize(x, dim=1)
        cos = window_dots(xn, xn, offsets)                                            # (G, O, h, w)
        logits = self.beta.view(-1, 1, 1, 1) * cos + self.adjacency_weight * adjacency
        allowed = window & (cos >= 0)
        p = torch.softmax(logits.masked_fill(~allowed, NEG_INF), 1)
        return p * allowed.any(1, keepdim=True)

    def forward(self, x, adjacency, window, offsets):
        p = self.attention(x, adjacency, window, offsets)
        return window_aggregate(p, x, offsets)


def _batched_linear_init(num_graphs: int, fan_in: int, fan_out: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)      # nn.Linear's default range
    return torch.empty(num_graphs, fan_in, fan_out).uniform_(-bound, bound)


class A2GNN(nn.Module):
    """The per-image network, one independent set of weights for each of ``num_graphs`` graphs.

    ``forward(x, adjacency, window, offsets)`` with x (G, D, h, w) node features -> (logits (G, C, h, w),
    hidden (G, hidden, h, w): the last attention layer's output)."""

    def __init__(self, num_graphs: int, in_dim: int, num_outputs: int, hidden: int = 256, layers: int = 3,
                 dropout: float = 0.5, adjacency_weight: float = 10.0):
        super().__init__()
        g = int(num_graphs)
        self.embed = nn.Parameter(_batched_linear_init(g, in_dim, hidden))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(AffinityAttention(g, adjacency_weight) for _ in range(int(layers)))
        self.classify = nn.Parameter(_batched_linear_init(g, hidden, num_outputs))
        self.classify_bias = nn.Parameter(_batched_linear_init(g, hidden, num_outputs)[:, 0].contiguous())

    def forward(self, x, adjacency, window, offsets):
        g, _, h, w = x.shape
        z = torch.bmm(self.embed.transpose(1, 2), x.flatten(2))                    # (G, hidden, N)
        z = self.dropout(F.relu(z)).view(g, -1, h, w)
        for layer in self.layers:
            z = layer(z, adjacency, window, offsets)
        logits = torch.bmm(self.classify.transpose(1, 2), z.flatten(2)) + self.classify_bias.unsqueeze(2)
        return logits.view(g, -1, h, w), z


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class GraphInput:
    """One image's graph before batching.

    features: (D, h, w) node features (L1-normalised rows); affinity_features: (Df, h, w) AffinityNet f;
    seeds: uint8 (stride h, stride w) seeds at (padded) image resolution, 255 = unlabelled or padding;
    rgb: (3, h, w) the image in [0, 1] averaged over each grid cell; allowed: labels the output may take
    (0 and c+1 of the image's classes); boxes: grid boxes (label c+1, y0, x0, y1, x1) inclusive (box variant);
    stride: seed pixels per grid node."""

    features: torch.Tensor
    affinity_features: torch.Tensor
    seeds: np.ndarray
    rgb: torch.Tensor
    allowed: list
    boxes: list = field(default_factory=list)
    stride: int = GRAPH_STRIDE


@dataclass
class GraphBatch:
    """G graphs padded to one grid (:func:`collate_graphs`): features (G, D, h, w), adjacency / window
    (G, O, h, w), valid (G, h, w) bool, seeds int64 (G, stride h, stride w), rgb (G, 3, h, w), allowed (G, C)
    bool, boxes (per graph), offsets, stride, sizes (each graph's own (h, w))."""

    features: torch.Tensor
    adjacency: torch.Tensor
    window: torch.Tensor
    valid: torch.Tensor
    seeds: torch.Tensor
    rgb: torch.Tensor
    allowed: torch.Tensor
    boxes: list
    offsets: list
    stride: int
    sizes: list


def collate_graphs(graphs: list[GraphInput], window_radius: int, num_outputs: int, device="cpu") -> GraphBatch:
    """Pad the graphs to their largest grid and build the window edges (module docstring)."""
    stride = graphs[0].stride
    if any(g.stride != stride for g in graphs):
        raise ValueError("collate_graphs: graphs of one batch need the same stride")
    sizes = [tuple(g.features.shape[-2:]) for g in graphs]
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    count = len(graphs)

    def padded(t, fill=0.0):
        return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=fill)

    features = torch.stack([padded(g.features.float()) for g in graphs]).to(device)
    aff_f = torch.stack([padded(g.affinity_features.float()) for g in graphs]).to(device)
    rgb = torch.stack([padded(g.rgb.float()) for g in graphs]).to(device)
    valid = torch.zeros(count, h, w, dtype=torch.bool, device=device)
    seeds = torch.full((count, h * stride, w * stride), IGNORE, dtype=torch.int64)
    allowed = torch.zeros(count, num_outputs, dtype=torch.bool)
    for i, (g, (gh, gw)) in enumerate(zip(graphs, sizes)):
        valid[i, :gh, :gw] = True
        sh, sw = g.seeds.shape
        if sh > gh * stride or sw > gw * stride:
            raise ValueError(f"seeds {g.seeds.shape} do not fit a {gh}x{gw} grid at stride {stride}")
        seeds[i, :sh, :sw] = torch.from_numpy(g.seeds.astype(np.int64))
        allowed[i, list(g.allowed)] = True
    offsets = window_offsets(window_radius)
    return GraphBatch(features, window_affinities(aff_f, offsets), window_mask(valid, offsets), valid,
                      seeds.to(device), rgb, allowed.to(device), [list(g.boxes) for g in graphs], offsets, stride,
                      sizes)


# ----------------------------------------------------------------------------------------------- losses
def upsample_logits(logits: torch.Tensor, stride: int) -> torch.Tensor:
    """(G, C, h, w) -> (G, C, stride h, stride w), bilinear (align_corners False, as the random walk)."""
    if stride == 1:
        return logits
    return F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)


def seed_loss(logits_up: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Per-graph CE(background seeds) + CE(foreground seeds): logits_up (G, C, H, W), seeds int64 (G, H, W)
    (255 left out) -> (G,) (a term without seeds is 0)."""
    ce = F.cross_entropy(logits_up, seeds.clamp(max=logits_up.shape[1] - 1), reduction="none")
    bg = (seeds == 0).float()
    fg = ((seeds > 0) & (seeds != IGNORE)).float()
    dims = (1, 2)
    return (ce * bg).sum(dims) / bg.sum(dims).clamp(min=1) + (ce * fg).sum(dims) / fg.sum(dims).clamp(min=1)


def gated_crf_kernel(rgb: torch.Tensor, valid: torch.Tensor, radius: int = 5, xy: float = 6.0, rgb_sigma: float = 0.1,
                     stride: int = GRAPH_STRIDE) -> tuple[torch.Tensor, list]:
    """Kernel of the gated-CRF loss on the grid: (K (G, O, h, w), offsets) over the square window of ``radius``
    without (0, 0); K = exp(-|d|^2 stride^2 / (2 xy^2) - |rgb_i - rgb_j|^2 / (2 rgb_sigma^2)) between real nodes,
    0 elsewhere."""
    offsets = [o for o in window_offsets(radius) if o != (0, 0)]
    nb = neighbour_stack(rgb, offsets)                                                 # (G, O, 3, h, w)
    colour = ((rgb.unsqueeze(1) - nb) ** 2).sum(2) / (2 * rgb_sigma ** 2)
    dist = torch.tensor([(dy * dy + dx * dx) * stride * stride / (2 * xy ** 2) for dy, dx in offsets],
                        device=rgb.device).view(1, -1, 1, 1)
    return torch.exp(-colour - dist) * window_mask(valid, offsets), offsets


def gated_crf_loss(probs: torch.Tensor, kernel: torch.Tensor, offsets, pairs: torch.Tensor) -> torch.Tensor:
    """Per-graph sum_ij K_ij (1 - <p_i, p_j>) / (number of pairs): probs (G, C, h, w), kernel (G, O, h, w),
    pairs (G,) -> (G,)."""
    agree = window_dots(probs, probs, offsets)                                         # (G, O, h, w)
    return (kernel * (1.0 - agree)).sum((1, 2, 3)) / pairs.clamp(min=1)


def mil_loss(logits: torch.Tensor, hidden: torch.Tensor, boxes: list) -> torch.Tensor:
    """The box MIL loss (§8), per graph: in each grid box (label l, y0, x0, y1, x1), the pixel of highest p_l in
    every row and in every column get CE to l, plus the mean (1 - cos) between the hidden features of those
    pixels. logits (G, C, h, w), hidden (G, K, h, w) -> (G,)."""
    out = logits.new_zeros(logits.shape[0])
    probs = torch.softmax(logits, 1)
    for g, graph_boxes in enumerate(boxes):
        terms = []
        for label, y0, x0, y1, x1 in graph_boxes:
            p = probs[g, label, y0:y1 + 1, x0:x1 + 1]
            bw = p.shape[1]
            rows = torch.arange(p.shape[0], device=p.device) * bw + p.argmax(1)
            cols = p.argmax(0) * bw + torch.arange(bw, device=p.device)
            picked = torch.unique(torch.cat([rows, cols]))
            box_logits = logits[g, :, y0:y1 + 1, x0:x1 + 1].flatten(1)[:, picked].t()
            ce = F.cross_entropy(box_logits, torch.full((len(picked),), int(label), device=p.device))
            feats = F.normalize(hidden[g, :, y0:y1 + 1, x0:x1 + 1].flatten(1)[:, picked].t(), dim=1)
            n = len(picked)
            spread = (1.0 - feats @ feats.t()).sum() / max(1, n * (n - 1))
            terms.append(ce + spread)
        if terms:
            out[g] = torch.stack(terms).mean()
    return out


@torch.no_grad()
def consistency_check(logits_up: torch.Tensor, seeds: torch.Tensor, boxes: list, stride: int) -> int:
    """The box consistency check (§8): in each box, the seeds of the box's label whose output vector (logits at
    seed resolution, (G, C, H, W)) has cosine < 0 to the box prototype (their mean vector) become 255, in place.
    Returns the number of seeds dropped. (The spec does not say which features; the hidden ones are non-negative
    after ReLU and averaging, so their cosine is never < 0: the logits are used.)"""
    dropped = 0
    for g, graph_boxes in enumerate(boxes):
        for label, y0, x0, y1, x1 in graph_boxes:
            ys, xs = slice(y0 * stride, (y1 + 1) * stride), slice(x0 * stride, (x1 + 1) * stride)
            region = seeds[g, ys, xs]
            mine = region == label
            if not mine.any():
                continue
            vectors = F.normalize(logits_up[g, :, ys, xs].permute(1, 2, 0)[mine], dim=1)
            prototype = F.normalize(vectors.mean(0), dim=0)
            bad = torch.zeros_like(mine)
            bad[mine] = vectors @ prototype < 0
            region[bad] = IGNORE
            dropped += int(bad.sum())
    return dropped


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainParams:
    """Per-image schedule (config ``a2gnn`` + its preset ``image`` / ``box``; §8)."""

    epochs: int = 50                 # per phase (box: 150)
    lr: float = 0.03                 # box: 0.035
    weight_decay: float = 5e-4
    hidden: int = 256
    layers: int = 3
    dropout: float = 0.5
    adjacency_weight: float = 10.0
    window_radius: int = 3           # box / scribble: 4
    gcrf_weight: float = 0.3         # box: 0.01
    gcrf_radius: int = 5
    gcrf_xy: float = 6.0
    gcrf_rgb: float = 0.1
    mil_weight: float = 1.0          # box only (the spec gives no weight: 1)


def train_graphs(batch: GraphBatch, params: TrainParams = TrainParams(), seed: int = 0,
                 mil: bool = False) -> tuple[torch.Tensor, dict]:
    """Train one A2GNN per graph of ``batch`` (phase A, then phase B; module docstring) and return
    (probs (G, C, h, w): the softmax of the trained networks in eval mode, restricted to each graph's allowed
    labels and 0 on padding nodes, {'loss_a': [first, last], 'loss_b': [first, last] of the mean per-graph
    loss, 'dropped_seeds': by the consistency check})."""
    device = batch.features.device
    torch.manual_seed(seed)
    features = batch.features / batch.features.abs().sum(1, keepdim=True).clamp(min=1e-12)   # L1 rows
    model = A2GNN(features.shape[0], features.shape[1], batch.allowed.shape[1], params.hidden, params.layers,
                  params.dropout, params.adjacency_weight).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    kernel, kernel_offsets = gated_crf_kernel(batch.rgb, batch.valid, params.gcrf_radius, params.gcrf_xy,
                                              params.gcrf_rgb, batch.stride)
    pairs = window_mask(batch.valid, kernel_offsets).float().sum((1, 2, 3))
    forbidden = (~batch.allowed).view(*batch.allowed.shape, 1, 1)
    seeds = batch.seeds.clone()
    logs = {"loss_a": [], "loss_b": [], "dropped_seeds": 0}

    def forward():
        logits, hidden = model(features, batch.adjacency, batch.window, batch.offsets)
        return logits.masked_fill(forbidden, NEG_INF / 1e5), hidden    # -1e4: exp underflows, grads stay finite

    model.train()
    for phase in ("a", "b"):
        if phase == "b" and mil:
            model.eval()
            with torch.no_grad():
                logs["dropped_seeds"] = consistency_check(upsample_logits(forward()[0], batch.stride), seeds,
                                                          batch.boxes, batch.stride)
            model.train()
        for epoch in range(int(params.epochs)):
            logits, hidden = forward()
            loss = seed_loss(upsample_logits(logits, batch.stride), seeds)
            if mil:
                loss = loss + params.mil_weight * mil_loss(logits, hidden, batch.boxes)
            if phase == "b":
                loss = loss + params.gcrf_weight * gated_crf_loss(torch.softmax(logits, 1), kernel, kernel_offsets,
                                                                  pairs)
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            if epoch in (0, int(params.epochs) - 1):
                logs[f"loss_{phase}"].append(float(loss.detach().mean()))
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(forward()[0], 1) * batch.valid.unsqueeze(1)
    return probs, logs
