"""Random walk with AffinityNet affinities (PSA; reused by SEAM, PPC, SC-CAM, A2GNN; related-methods.md §1.7),
on the device, without any dense N x N matrix.

On the stride-8 grid (h x w, N = h w nodes) of an image:

* A = the radius-r affinities a_ij = exp(-mean_c |f_i - f_j|) of every pair of grid pixels closer than r
  (dx^2 + dy^2 < r^2; 68 neighbours for r = 5), symmetric, with unit diagonal;
* T = A^beta (element-wise) normalised per column: T_ij = A_ij^beta / sum_k A_kj^beta (column-stochastic);
* the 8x8-average-pooled score maps V (K x N: background + classes) are propagated t = 2^logt times,
  V <- V T (each step a weighted average over a pixel's neighbours, so a constant channel stays constant and
  values stay in [0, 1]), upsampled bilinearly x8, cropped to the image and argmaxed.

PSA squares a dense T logt times on the GPU; here T stays sparse (``A`` has (2 x 34 + 1) N entries) and is applied
t times to V: as a CSR matrix (:class:`TransitionMatrix`, ``torch.sparse.mm``) or in banded form (one weight map
per offset, :func:`propagate_banded`) (:func:`random_walk_grid`; sparse by default, the faster here).

One difference from PSA: its pairs come from a source crop (rows [0 : h-4], columns [4 : w-4]), so pairs of two
pixels in the border strip are missing from its A; here every in-grid pair within the radius is used.

Presets (beta, logt, background; ``random_walk.preset``): PSA 8 / 8 / power alpha 16 (README: "beta=8, gamma=5,
t=256"), SEAM 8 / 6 / power alpha 6, PPC 8 / 6 / constant 0.27, smaf 8 / 6 / the run's background rule applied to the
walked maps after dividing each by its maximum (:class:`RandomWalkRefiner`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.a2gnn import window_pad
from ..models.affinity import PSA_RADIUS, psa_offsets
from .pool import stack_cam_maps

BG_MODES = ("power", "constant", "rule")
RW_STRIDE = 8


def disc_offsets(radius: int = PSA_RADIUS) -> list[tuple[int, int]]:
    """Every non-zero offset (dy, dx) with dy^2 + dx^2 < r^2 (68 for r = 5): the PSA half offsets and their
    negatives."""
    half = psa_offsets(radius)
    return half + [(-dy, -dx) for dy, dx in half]


def _overlap(h: int, w: int, dy: int, dx: int):
    """Slices (rows_i, cols_i, rows_j, cols_j) of the grid pixels i with j = i + (dy, dx) inside the grid."""
    ri = slice(max(0, -dy), min(h, h - dy))
    ci = slice(max(0, -dx), min(w, w - dx))
    rj = slice(ri.start + dy, ri.stop + dy)
    cj = slice(ci.start + dx, ci.stop + dx)
    return ri, ci, rj, cj


def neighbour_affinities(f: torch.Tensor, radius: int = PSA_RADIUS) -> torch.Tensor:
    """Affinities of each grid pixel to its neighbours in banded form: f (D, h, w) -> (O, h, w) with
    O = len(:func:`disc_offsets`); entry [o, y, x] = a between (y, x) and (y, x) + offset o, 0 outside the grid."""
    if f.dim() == 4:
        if f.shape[0] != 1:
            raise ValueError(f"neighbour_affinities: one image at a time, got a batch of {f.shape[0]}")
        f = f[0]
    h, w = f.shape[-2:]
    half = psa_offsets(radius)
    out = f.new_zeros((2 * len(half), h, w))
    for o, (dy, dx) in enumerate(half):
        ri, ci, rj, cj = _overlap(h, w, dy, dx)
        if ri.stop <= ri.start or ci.stop <= ci.start:
            continue
        a = torch.exp(-(f[:, ri, ci] - f[:, rj, cj]).abs().mean(0))
        out[o, ri, ci] = a                        # i -> i + o
        out[len(half) + o, rj, cj] = a            # j -> j - o (symmetric)
    return out


def transition_weights(aff: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Banded transition weights from :func:`neighbour_affinities` (O, h, w): ``(w_self (h, w), w_nb (O, h, w))``
    with, for column j, T_jj = w_self[j] and T_{j+o, j} = w_nb[o, j]: A^beta (unit diagonal) divided by its
    column sums."""
    a = aff.pow(float(beta))
    den = a.sum(0) + 1.0
    return 1.0 / den, a / den


def propagate_banded(v: torch.Tensor, w_self: torch.Tensor, w_nb: torch.Tensor, offsets, steps: int) -> torch.Tensor:
    """``steps`` products V <- V T in banded form: v (K, h, w); returns (K, h, w)."""
    h, w = v.shape[-2:]
    pad = window_pad(offsets)
    for _ in range(int(steps)):
        padded = F.pad(v, (pad, pad, pad, pad))
        out = v * w_self
        for o, (dy, dx) in enumerate(offsets):
            out.addcmul_(w_nb[o], padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w])
        v = out
    return v


class TransitionMatrix:
    """The random-walk matrix T (N x N, column-stochastic) of one image as a sparse CSR matrix of T^T on the
    device (so that V T = (T^T V^T)^T is one ``torch.sparse.mm``).

    Build with :meth:`from_affinities` (banded affinities of :func:`neighbour_affinities`) or
    :meth:`from_features`. ``propagate(v, steps)`` with v (K, h, w) returns V T^steps as (K, h, w).
    """

    def __init__(self, transposed_csr: torch.Tensor, size: tuple[int, int]):
        self.transposed, self.size = transposed_csr, tuple(size)

    @classmethod
    def from_affinities(cls, aff: torch.Tensor, beta: float, radius: int = PSA_RADIUS) -> "TransitionMatrix":
        o, h, w = aff.shape
        offsets = disc_offsets(radius)
        if o != len(offsets):
            raise ValueError(f"TransitionMatrix: {o} affinity maps for radius {radius} (expected {len(offsets)})")
        w_self, w_nb = transition_weights(aff, beta)
        dev = aff.device
        n = h * w
        idx = torch.arange(n, device=dev).view(h, w)
        rows, cols, vals = [idx.flatten()], [idx.flatten()], [w_self.flatten()]
        for k, (dy, dx) in enumerate(offsets):
            ri, ci, rj, cj = _overlap(h, w, dy, dx)
            if ri.stop <= ri.start or ci.stop <= ci.start:
                continue
            # T^T[j, i] = T[i, j] with i = j + o: row j of T^T holds the weights of column j of T
            rows.append(idx[ri, ci].flatten())
            cols.append(idx[rj, cj].flatten())
            vals.append(w_nb[k, ri, ci].flatten())
        coo = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (n, n),
                                      check_invariants=False)
        with warnings.catch_warnings():   # "sparse CSR support is in beta": the two ops used here are stable
            warnings.simplefilter("ignore", UserWarning)
            return cls(coo.coalesce().to_sparse_csr(), (h, w))

    @classmethod
    def from_features(cls, f: torch.Tensor, beta: float, radius: int = PSA_RADIUS) -> "TransitionMatrix":
        """From AffinityNet features f (D, h, w) or (1, D, h, w)."""
        return cls.from_affinities(neighbour_affinities(f, radius), beta, radius)

    def matrix(self) -> torch.Tensor:
        """T itself as a sparse COO tensor (N x N); small grids only (tests): ``.to_dense()`` it there."""
        return self.transposed.to_sparse_coo().t().coalesce()

    def propagate(self, v: torch.Tensor, steps: int) -> torch.Tensor:
        k, h, w = v.shape
        if (h, w) != self.size:
            raise ValueError(f"TransitionMatrix: maps of {(h, w)} for a {self.size} grid")
        x = v.reshape(k, h * w).t().contiguous()
        for _ in range(int(steps)):
            x = torch.sparse.mm(self.transposed, x)
        return x.t().reshape(k, h, w)


def random_walk_grid(f: torch.Tensor, v: torch.Tensor, beta: float, logt: int, radius: int = PSA_RADIUS,
                     method: str = "auto") -> torch.Tensor:
    """The walk on the grid: AffinityNet features f (D, h, w) (or (1, D, h, w)), pooled score maps v (K, h, w)
    -> V T^(2^logt) (K, h, w). ``method``: ``sparse`` (CSR mat-mat products), ``banded`` (one weight map per
    offset) or ``auto`` (= sparse: on one CPU thread 0.12 / 0.29 s against 0.17 / 0.61 s banded for a VOC-sized
    63 x 47 grid, 21 maps, logt 6 / 8)."""
    if method == "auto":
        method = "sparse"
    steps = 2 ** int(logt)
    aff = neighbour_affinities(f.float(), radius)
    if method == "sparse":
        return TransitionMatrix.from_affinities(aff, beta, radius).propagate(v.float(), steps)
    if method == "banded":
        w_self, w_nb = transition_weights(aff, beta)
        return propagate_banded(v.float(), w_self, w_nb, disc_offsets(radius), steps)
    raise ValueError(f"random walk method {method!r}: expected auto, sparse or banded")


@dataclass(frozen=True)
class RandomWalkParams:
    """Constants of the random walk (config ``random_walk`` + its preset, related-methods.md §1.7)."""

    beta: float = 8.0
    logt: int = 6
    radius: int = PSA_RADIUS
    bg: str = "rule"          # power: (1 - max_c M_c)^alpha | constant: bg_threshold | rule: the run's rule
    alpha: float = 16.0
    bg_threshold: float = 0.27
    method: str = "auto"

    def __post_init__(self):
        if self.bg not in BG_MODES:
            raise ValueError(f"random walk background {self.bg!r}: expected one of {', '.join(BG_MODES)}")

    @classmethod
    def from_config(cls, sect) -> "RandomWalkParams":
        """From the ``random_walk`` section: radius, propagation (-> ``method``) and the selected preset's beta,
        logt, bg, alpha, bg_threshold (``random_walk.<preset>.*``)."""
        from ..config import ConfigError

        preset = sect.get(str(sect.preset)) or {}
        try:
            return cls(float(preset["beta"]), int(preset["logt"]), int(sect.radius), str(preset["bg"]),
                       float(preset.get("alpha", 16.0)), float(preset.get("bg_threshold", 0.27)),
                       str(sect.propagation))
        except KeyError as err:
            raise ConfigError(f"random_walk.{sect.preset} lacks the key {err} (needs beta, logt, bg)") from None
        except ValueError as err:
            raise ConfigError(f"random_walk.{sect.preset}: {err}") from None


def _normalized_image(image: np.ndarray, base_long: int, device) -> torch.Tensor:
    from ..data.transforms import normalize, resize_image

    h, w = image.shape[:2]
    if base_long and max(h, w) != base_long:
        ratio = base_long / max(h, w)
        image = resize_image(image, (max(1, round(h * ratio)), max(1, round(w * ratio))))
    return torch.from_numpy(normalize(image))[None].to(device)


class RandomWalkRefiner:
    """Per-image refiner of CAM ``.npy`` dicts (protocol of :mod:`smaf.refine.pool`) by AffinityNet + random walk,
    on ``device`` (run it in the main process: ``workers=1``).

    Per image: the network sees the image (long side resized to ``base_long`` when > 0) -> f at stride 8; the
    maps M are resized to the network input, the background channel is prepended (``params.bg``: the power
    background (1 - max M)^alpha or a constant, walked with the maps as PSA and PPC do), the maps are
    8x8-average-pooled to f's grid, walked (:func:`random_walk_grid`), upsampled x8, cropped, resized back to the
    image and argmaxed. With ``bg = "rule"`` only the class maps walk; each walked map is divided by its maximum
    (the walk averages a map over its object, so its peak drops) and ``bg_rule`` (fixed or per-image Otsu)
    scores the walked maps, as it scores fused maps.

    :meth:`refine_scores` returns (label, ``{c: walked M_c at image size}``).
    """

    input_kind = "npy"
    name = "rw"

    def __init__(self, model, params: RandomWalkParams = RandomWalkParams(), bg_rule=None, base_long: int = 0,
                 device="cpu"):
        from ..cam.background import BackgroundRule

        self.model, self.params, self.base_long = model, params, int(base_long)
        self.bg_rule = bg_rule if bg_rule is not None else BackgroundRule()
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def _background(self, maps: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.bg == "power":
            return (1.0 - maps.amax(0, keepdim=True)).clamp_(min=0.0).pow_(p.alpha)
        value = p.bg_threshold if p.bg == "constant" else float(self.bg_rule(maps))
        return torch.full_like(maps[:1], value)

    @torch.no_grad()
    def features(self, image: np.ndarray) -> tuple[torch.Tensor, tuple]:
        """AffinityNet features of an RGB uint8 image (H, W, 3): ``(f (D, ceil(H'/8), ceil(W'/8)) on the device,
        (H', W'))`` with (H', W') the network input size (long side ``base_long`` when > 0)."""
        x = _normalized_image(image, self.base_long, self.device)
        return self.model(x)[0].float(), tuple(x.shape[-2:])

    @torch.no_grad()
    def walk(self, f: torch.Tensor, input_size: tuple, cams: dict, image_size: tuple) -> tuple[np.ndarray, dict]:
        """The walk of one image's maps given its features ``f`` (:meth:`features`) and network input size:
        cams ``{c: (H, W)}`` with (H, W) = ``image_size`` -> (uint8 (H, W) label map, walked dict)."""
        h, w = image_size
        keys = sorted(cams)
        if not keys:
            return np.zeros((h, w), np.uint8), {}
        up = self.walk_scores(f, input_size, cams, image_size)
        p = self.params
        if p.bg == "rule":
            # A walk averages each map over its object: peaks drop while the rule's score would not, so the
            # walked maps are divided by their maximum (as stage 1 normalises fused maps) and the rule scores them.
            up = up / (up.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
            up = torch.cat([torch.full_like(up[:1], float(self.bg_rule(up))), up])
        lut = np.array([0] + [k + 1 for k in keys], np.uint8)
        label = lut[up.argmax(0).cpu().numpy()]
        fg = up[1:].clamp_(0.0, 1.0).cpu().numpy()
        return label, {k: fg[i] for i, k in enumerate(keys)}

    @torch.no_grad()
    def walk_scores(self, f: torch.Tensor, input_size: tuple, cams: dict, image_size: tuple) -> torch.Tensor:
        """The walked score maps at image size (H, W) = ``image_size``, before any labelling: (1 + K, H, W)
        [walked background; walked maps of the sorted keys] for a power or constant background, (K, H, W) (the
        class maps only) for ``bg = "rule"``. ``cams`` must not be empty."""
        h, w = image_size
        keys = sorted(cams)
        maps = stack_cam_maps(cams, keys, (h, w), self.device)
        hi, wi = input_size
        gh, gw = f.shape[-2:]
        p = self.params
        # bg rule: only the class maps walk; the rule then scores the walked maps (in walk)
        scores = (maps if p.bg == "rule" else torch.cat([self._background(maps), maps]))[None]
        if (hi, wi) != (h, w):
            scores = F.interpolate(scores, size=(hi, wi), mode="bilinear", align_corners=False)
        pooled = F.avg_pool2d(scores, RW_STRIDE, RW_STRIDE, ceil_mode=True)
        if pooled.shape[-2:] != (gh, gw):
            pooled = F.adaptive_avg_pool2d(scores, (gh, gw))
        walked = random_walk_grid(f, pooled[0], p.beta, p.logt, p.radius, p.method)[None]
        up = F.interpolate(walked, size=(gh * RW_STRIDE, gw * RW_STRIDE), mode="bilinear", align_corners=False)
        up = up[..., :hi, :wi]
        if (hi, wi) != (h, w):
            up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
        return up[0]

    @torch.no_grad()
    def refine_scores(self, image: np.ndarray, cams: dict, labelled: list) -> tuple[np.ndarray, dict]:
        """image RGB uint8 (H, W, 3), cams ``{c: (H, W)}`` -> (uint8 (H, W) label map, walked dict)."""
        if not cams:
            return np.zeros(image.shape[:2], np.uint8), {}
        f, input_size = self.features(image)
        return self.walk(f, input_size, cams, image.shape[:2])

    def __call__(self, image: np.ndarray, cams: dict, labelled: list) -> np.ndarray:
        return self.refine_scores(image, cams, labelled)[0]
