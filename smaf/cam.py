"""CAM inference: multi-scale, flip-fused attention maps (SMAF stage 1 and 3, validation).

One code path serves every caller. Per image and scale, the original and its horizontal flip go through
the network as ONE batch of two; activation, upsampling to the original size, un-flipping, summing and
max-normalisation all happen on the model's device, and only the final maps of the labelled classes are
copied back.

Activation per network output (related-methods §1.4): models with a background channel (EPS layout,
C+1 outputs, background last) use softmax over the C+1 channels and keep the C foreground channels;
plain CAM models (C outputs) use ReLU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cam_activation(cam: torch.Tensor, has_background: bool) -> torch.Tensor:
    """(B, K, h, w) raw CAM -> (B, C, h, w) foreground attention: softmax[:C] (K = C+1) or ReLU (K = C)."""
    cam = cam.float()
    if has_background:
        return torch.softmax(cam, dim=1)[:, :-1]
    return F.relu(cam)


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp``: fp16 or bf16 on CUDA, bf16 on CPU (oneDNN bf16 kernels: about 1.6x
    faster convolutions on CPUs with AVX512-BF16/AMX, see :func:`cpu_has_fast_bf16`); a no-op context for
    ``none`` and for fp16 on CPU (fp32 there)."""
    if amp in (None, "", "none"):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r}: expected none, fp16 or bf16")
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class FusedResult:
    """Fused maps of one image.

    ``classes``: labelled class indices (list of int, VOC order 0..C-1); ``maps``: float32 (len(classes), H, W)
    in [0, 1], on the model's device; ``feature``: (D, h, w) feature f of the scale-1 unflipped pass (or of
    the scale nearest to 1) when requested, else None.
    """

    classes: list
    maps: torch.Tensor
    feature: torch.Tensor | None = None


@torch.no_grad()
def fuse_image(model, scaled: list, labels: torch.Tensor, out_size: tuple, flip: bool = True, amp: str = "none",
               channels_last: bool = False, with_feature: bool = False, scales: list | None = None,
               flip_in_batch: bool | None = None) -> FusedResult:
    """Multi-scale (x flip) fused attention maps of one image.

    Args:
        model: a CAMNet (``forward(x) -> (logits, cam, f)``, ``has_background``) in eval mode.
        scaled: per scale, the normalised image tensor (3, h_s, w_s) (CPU or device).
        labels: float (C,) image-level labels; only labelled classes are computed.
        out_size: (H, W) of the original image.
        flip: also run the horizontally flipped image (in the same batch on a GPU, as a second pass on a CPU)
            and un-flip its maps.
        amp / channels_last: CUDA speed options.
        with_feature: also return f of the unflipped pass at the scale nearest to 1 (for prototypes).
        scales: the scale of each entry of ``scaled`` (only used to pick the feature pass).
        flip_in_batch: run the flipped copy in the original's batch (default: on a GPU, not on a CPU).

    Returns a :class:`FusedResult`: sum over scales and flips of the upsampled activations of the labelled
    classes, each class divided by its maximum + 1e-5.
    """
    device = next(model.parameters()).device
    classes = torch.nonzero(labels > 0.5).flatten().tolist()
    height, width = out_size
    total = torch.zeros((len(classes), height, width), dtype=torch.float32, device=device)
    feature_pass = 0
    if with_feature and scales is not None:
        feature_pass = min(range(len(scales)), key=lambda i: abs(float(scales[i]) - 1.0))
    feature = None
    # On a GPU the flipped copy shares the original's batch (one launch sequence for both). On a CPU two
    # batch-1 passes are faster: every activation of a batch of 2 is twice as large, and those beyond glibc's
    # 32 MB mmap limit come back as fresh, page-faulting memory at every op (EfficientNet-Lite0 folded, scales
    # 0.5-2 of ~250x320 images: one thread 1.97 s vs 2.36 s per image, two threads 1.00 s vs 1.21 s).
    stack_flip = flip and (device.type != "cpu" if flip_in_batch is None else flip_in_batch)
    for i, x in enumerate(scaled):
        x = x.to(device, non_blocking=True)
        if stack_flip:
            batches = [torch.stack([x, x.flip(-1)])]
        else:
            batches = [x[None], x.flip(-1)[None]] if flip else [x[None]]
        cams = []
        for batch in batches:
            if channels_last and device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                _, cam, f = model(batch)
            if with_feature and i == feature_pass and feature is None:
                feature = f[0].float()
            cams.append(cam)
        if not classes:
            continue
        cam = cams[0] if len(cams) == 1 else torch.cat(cams)
        act = cam_activation(cam, model.has_background)[:, classes]
        up = F.interpolate(act, size=(height, width), mode="bilinear", align_corners=False)
        total += up[0]
        if flip:
            total += up[1].flip(-1)
    if classes:
        total /= total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5
    return FusedResult(classes, total, feature)


BG_METHODS = ("fixed", "otsu")


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float | None:
    """Otsu's threshold of scores in [0, 1] (any shape, any device).

    The values are histogrammed into ``bins`` equal bins; the returned t is the bin edge that maximises the
    between-class variance w0 w1 (mu0 - mu1)^2 of {values < t} and {values >= t}. Returns None when no edge
    separates two non-empty classes (all values in one bin).
    """
    v = values.detach().float().flatten().clamp(0.0, 1.0)
    hist = torch.histc(v, bins=bins, min=0.0, max=1.0).double()
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) / bins
    w0 = hist.cumsum(0)
    m0 = (hist * centres).cumsum(0)
    total, mean_total = w0[-1], m0[-1]
    den = w0 * (total - w0)
    # (total w0 w1 (mu0 - mu1)^2 = (mean_total w0 - total m0)^2 / (w0 w1)): same argmax, no divisions by 0
    between = torch.where(den > 0, (mean_total * w0 - total * m0) ** 2 / den.clamp(min=1e-12),
                          torch.zeros_like(den))
    if float(between.max()) <= 0:
        return None
    return (int(between.argmax()) + 1) / bins


def background_score(maps, method: str = "fixed", fixed: float = 0.2) -> float:
    """The background score of one image: argmax over [score; maps] labels a pixel background.

    Args:
        maps: (K, H, W) fused maps of the image's labelled classes in [0, 1] (torch tensor or NumPy array).
        method: ``fixed`` -> ``fixed`` for every image (the spec's 0.20 suits softmax maps of a model with a
            background channel); ``otsu`` -> Otsu's threshold of the per-pixel maximum over the K maps, a
            per-image rule that needs no ground truth and adapts to how far a ReLU CAM spreads.
        fixed: the constant (also the fallback for ``otsu`` when K = 0 or the maps are flat).
    """
    if method == "fixed":
        return float(fixed)
    if method != "otsu":
        raise ValueError(f"background method {method!r}: expected one of {', '.join(BG_METHODS)}")
    if len(maps) == 0:
        return float(fixed)
    maps = torch.as_tensor(maps)
    t = otsu_threshold(maps.amax(0))
    return float(fixed) if t is None else t


@dataclass(frozen=True)
class BackgroundRule:
    """How an image's background score is chosen (config: ``<section>.bg_method`` and the section's threshold).

    ``rule(maps) -> float`` with maps (K, H, W) of the labelled classes; see :func:`background_score`."""

    method: str = "fixed"
    threshold: float = 0.2

    def __post_init__(self):
        if self.method not in BG_METHODS:
            raise ValueError(f"bg_method={self.method!r}: expected one of {', '.join(BG_METHODS)}")

    @classmethod
    def from_section(cls, sect, section: str) -> "BackgroundRule":
        """The rule of config section ``section`` (its ``bg_method`` and ``bg_threshold``); a bad method is a
        :class:`~smaf.config.ConfigError` naming the key."""
        from .config import ConfigError

        method = str(sect.get("bg_method", "fixed"))
        if method not in BG_METHODS:
            raise ConfigError(f"{section}.bg_method={method!r}: expected one of {', '.join(BG_METHODS)} (fix the "
                              f"config or override it, e.g. {section}.bg_method=otsu)")
        return cls(method, float(sect.bg_threshold))

    def __call__(self, maps) -> float:
        return background_score(maps, self.method, self.threshold)

    def score_cam_dict(self, cams: dict) -> float:
        """The score of a saved CAM dict ``{class: (H, W) map}`` (:func:`smaf.io.load_cam_dict`)."""
        return self(torch.stack([torch.as_tensor(cams[k]) for k in sorted(cams)]) if cams else [])

    @property
    def report_value(self):
        """What reports store as ``bg_threshold``: the constant for ``fixed``, else the method name."""
        return self.threshold if self.method == "fixed" else self.method

    def __str__(self) -> str:
        if self.method == "fixed":
            return f"fixed {self.threshold:.2f}"
        return f"per-image Otsu (fallback {self.threshold:.2f})"


def label_from_maps(result: FusedResult, bg_threshold: float) -> torch.Tensor:
    """VOC label map (H, W) uint8 on the maps' device: argmax over [bg_threshold; fused maps]."""
    maps = result.maps
    if not result.classes:
        return torch.zeros(maps.shape[1:], dtype=torch.uint8, device=maps.device)
    bg = torch.full((1, *maps.shape[1:]), float(bg_threshold), device=maps.device)
    idx = torch.cat([bg, maps]).argmax(0)
    lut = torch.tensor([0] + [c + 1 for c in result.classes], dtype=torch.uint8, device=maps.device)
    return lut[idx]


def class_feature_means(feature: torch.Tensor, label: torch.Tensor, num_classes: int,
                        min_pixels: int = 10) -> dict:
    """Per-class mean feature of one image for prototypes.

    Args:
        feature: (D, h, w) feature f at feature resolution.
        label: (H, W) uint8 VOC label map at image resolution (nearest-downsampled to h x w here).
        num_classes: C; background (label 0) becomes prototype index C (background last, as the network).
        min_pixels: classes with fewer assigned feature pixels are skipped.

    Returns ``{prototype index: float32 (D,) CPU tensor}``.
    """
    d, h, w = feature.shape
    small = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    flat_f = feature.reshape(d, -1)
    flat_l = small.flatten()
    out = {}
    for value in torch.unique(flat_l).tolist():
        if value == 255:
            continue
        mask = flat_l == value
        if int(mask.sum()) < min_pixels:
            continue
        index = num_classes if value == 0 else value - 1
        out[index] = flat_f[:, mask].mean(1).float().cpu()
    return out
