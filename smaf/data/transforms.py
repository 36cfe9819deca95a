"""Image transforms. Training transforms act jointly on the image, a saliency map and soft maps, and
return their parameters so that later code can map crop pixels back to the original image
(:func:`crop_to_image_grid`).

Conventions: images are RGB uint8 (H, W, 3); saliency float32 (H, W); soft maps float32 (C, H, W).
Outputs are float32, channels first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..config import ConfigError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W): /255, minus ImageNet mean, over ImageNet std."""
    x = image.astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


RESIZE_METHODS = ("pil", "cv2")


def resize_image(image: np.ndarray, size: tuple[int, int], method: str = "cv2") -> np.ndarray:
    """Bicubic resize of an RGB uint8 image to ``size`` = (H, W) (uint8, saturated).

    ``method``: ``cv2`` = OpenCV's INTER_CUBIC (a = -0.75, no antialiasing when shrinking); ``pil`` = PIL's
    BICUBIC (a = -0.5, antialiased when shrinking: the kernel widens with the scale), what the PSA / EPS / SMAF
    reference code uses for its multi-scale inputs."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    if method == "pil":
        from PIL import Image

        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample=Image.BICUBIC))
    if method != "cv2":
        raise ValueError(f"resize method {method!r}: expected one of {', '.join(RESIZE_METHODS)}")
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)


def resize_maps(maps: np.ndarray, size: tuple[int, int], interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    """Resize float maps (C, H, W) or (H, W) to ``size`` = (H, W) (bilinear by default)."""
    h, w = size
    if maps.shape[-2:] == (h, w):
        return maps
    if maps.ndim == 2:
        return cv2.resize(maps, (w, h), interpolation=interpolation)
    out = np.empty((maps.shape[0], h, w), dtype=maps.dtype)
    for start in range(0, maps.shape[0], 128):  # cv2 takes at most CV_CN_MAX channels: 512 in 4.x, 128 in 5.x
        chunk = np.ascontiguousarray(maps[start:start + 128].transpose(1, 2, 0))
        res = cv2.resize(chunk, (w, h), interpolation=interpolation)
        out[start:start + 128] = res.reshape(h, w, -1).transpose(2, 0, 1)
    return out


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> np.ndarray:
    """torchvision-style ColorJitter on RGB uint8 (random factor order). Returns uint8 (H, W, 3)."""
    x = image.astype(np.float32)
    ops = []
    if brightness > 0:
        f = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        ops.append(lambda im, f=f: im * f)
    if contrast > 0:
        f = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        ops.append(lambda im, f=f: (im - _gray(im).mean()) * f + _gray(im).mean())
    if saturation > 0:
        f = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
        ops.append(lambda im, f=f: (im - _gray(im)[..., None]) * f + _gray(im)[..., None])
    if hue > 0:
        shift = rng.uniform(-hue, hue)
        ops.append(lambda im, s=shift: _shift_hue(im, s))
    for i in rng.permutation(len(ops)):
        x = np.clip(ops[i](x), 0, 255)
    return x.astype(np.uint8)


def _gray(im: np.ndarray) -> np.ndarray:
    return im[..., 0] * 0.299 + im[..., 1] * 0.587 + im[..., 2] * 0.114


def _shift_hue(im: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(np.clip(im, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 180))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)


@dataclass
class AugParams:
    """What a :class:`JointTrainTransform` did to one sample.

    ``orig_size`` (H, W) of the input; ``scaled_size`` (h, w) after the long-side resize by ``scale``;
    ``flip`` horizontal flip after resizing; the crop copies the scaled image region
    ``[img_top:img_top+ch, img_left:img_left+cw]`` to the output at ``[cont_top:.., cont_left:..]`` of a
    ``crop`` x ``crop`` canvas (zero padding elsewhere).
    """

    orig_size: tuple
    scaled_size: tuple
    scale: float
    flip: bool
    crop: int
    cont_top: int
    cont_left: int
    img_top: int
    img_left: int
    ch: int
    cw: int

    def to_dict(self) -> dict:
        return asdict(self)


def random_crop_box(rng: np.random.Generator, h: int, w: int, crop: int) -> tuple[int, int, int, int, int, int]:
    """PSA-style crop: a crop x crop window over an h x w image; where the image is smaller than the crop
    it is placed at a random offset inside the window. Returns (cont_top, cont_left, img_top, img_left, ch, cw)."""
    ch, cw = min(crop, h), min(crop, w)
    w_space, h_space = w - crop, h - crop
    cont_left, img_left = (0, int(rng.integers(w_space + 1))) if w_space > 0 else (int(rng.integers(-w_space + 1)), 0)
    cont_top, img_top = (0, int(rng.integers(h_space + 1))) if h_space > 0 else (int(rng.integers(-h_space + 1)), 0)
    return cont_top, cont_left, img_top, img_left, ch, cw


def long_side_range(value, key: str) -> tuple[int, int] | None:
    """The config value ``value`` of ``key`` (e.g. ``train_cls.resize_long``) as the inclusive range (lo, hi) of
    long sides a training image is resized to; empty (``[]`` / None) -> None, keep the size. Anything else
    than two integers with 0 < lo <= hi is a one-line ConfigError naming the key (the shared check of every
    training stage: a bad range would otherwise fail inside a loader worker)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 < value[0] <= value[1]):
        raise ConfigError(f"{key}={value!r}: expected [lo, hi] long sides in pixels with 0 < lo <= hi "
                          f"(e.g. [224, 320]), or [] to keep the image's size")
    return int(value[0]), int(value[1])


def crop_side(value, key: str) -> int:
    """The config value ``value`` of ``key`` (e.g. ``train_cls.crop``) as a positive crop side in pixels; anything
    else is a one-line ConfigError naming the key."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r}: expected a positive crop side in pixels (e.g. 256)")
    return value


class JointTrainTransform:
    """Random long-side resize, horizontal flip, colour jitter (image only) and random crop with padding,
    applied identically to the image, a saliency map and soft maps.

    Args:
        crop: output side (square).
        resize_long: (lo, hi) inclusive range of the long side after resizing; None keeps the size.
        scale_range: (lo, hi): instead of ``resize_long``, scale the image by a factor drawn uniformly from
            [lo, hi] (AFA: 0.5-2.0); None = use ``resize_long``.
        flip: random horizontal flip with probability 0.5.
        jitter: (brightness, contrast, saturation, hue) or None for no colour jitter.

    ``__call__(rng, image, saliency=None, soft=None)`` returns a dict with ``image`` float32 (3, crop, crop)
    normalised (padding 0), ``valid`` float32 (crop, crop), ``saliency`` float32 (crop, crop) and ``soft``
    float32 (C, crop, crop) when given, and ``params`` (an :class:`AugParams` as a dict).
    Image and saliency are resized bicubically, soft maps bilinearly.
    """

    def __init__(self, crop: int, resize_long=(256, 512), flip: bool = True, jitter=None, scale_range=None):
        self.crop = int(crop)
        self.resize_long = tuple(resize_long) if resize_long else None
        self.scale_range = tuple(float(v) for v in scale_range) if scale_range else None
        if self.scale_range is not None and not (len(self.scale_range) == 2 and 0 < self.scale_range[0]
                                                 <= self.scale_range[1]):
            raise ValueError(f"JointTrainTransform: scale_range must be (lo, hi) with 0 < lo <= hi, got "
                             f"{list(scale_range)}")
        self.flip = flip
        self.jitter = tuple(jitter) if jitter and any(jitter) else None

    def __call__(self, rng: np.random.Generator, image: np.ndarray, saliency: np.ndarray | None = None,
                 soft: np.ndarray | None = None) -> dict:
        h0, w0 = image.shape[:2]
        if self.scale_range:
            scale = float(rng.uniform(*self.scale_range))
        elif self.resize_long:
            target = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
            scale = target / max(h0, w0)
        else:
            scale = 1.0
        h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
        image = resize_image(image, (h, w))
        if saliency is not None:
            saliency = np.clip(resize_maps(saliency, (h, w), cv2.INTER_CUBIC), 0.0, 1.0)
        if soft is not None:
            soft = resize_maps(soft, (h, w))
        flip = bool(self.flip and rng.random() < 0.5)
        if flip:
            image = image[:, ::-1]
            saliency = saliency[:, ::-1] if saliency is not None else None
            soft = soft[:, :, ::-1] if soft is not None else None
        if self.jitter:
            image = color_jitter(image, rng, *self.jitter)
        box = random_crop_box(rng, h, w, self.crop)
        ct, cl, it, il, ch, cw = box
        c = self.crop
        out_img = np.zeros((3, c, c), np.float32)
        out_img[:, ct:ct + ch, cl:cl + cw] = normalize(np.ascontiguousarray(image[it:it + ch, il:il + cw]))
        valid = np.zeros((c, c), np.float32)
        valid[ct:ct + ch, cl:cl + cw] = 1.0
        out = {"image": out_img, "valid": valid}
        if saliency is not None:
            s = np.zeros((c, c), np.float32)
            s[ct:ct + ch, cl:cl + cw] = saliency[it:it + ch, il:il + cw]
            out["saliency"] = s
        if soft is not None:
            m = np.zeros((soft.shape[0], c, c), np.float32)
            m[:, ct:ct + ch, cl:cl + cw] = soft[:, it:it + ch, il:il + cw]
            out["soft"] = m
        out["params"] = AugParams((h0, w0), (h, w), scale, flip, c, *box).to_dict()
        return out


def crop_to_image_grid(params: dict, out_size: int) -> np.ndarray:
    """Sampling grid that maps an ``out_size`` x ``out_size`` grid over the crop canvas back to the
    original image, in ``grid_sample`` coordinates (align_corners=False): float32 (out_size, out_size, 2)
    with (x, y) in [-1, 1] on image pixels and outside [-1, 1] on padding."""
    c = params["crop"]
    h0, w0 = params["orig_size"]
    h, w = params["scaled_size"]
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * c / out_size  # canvas pixel-centre coordinates
    ys = centres - params["cont_top"] + params["img_top"]   # in the (flipped) scaled image
    xs = centres - params["cont_left"] + params["img_left"]
    if params["flip"]:
        xs = w - xs
    ys, xs = ys * h0 / h, xs * w0 / w                        # in the original image (continuous coordinates)
    gx, gy = 2 * xs / w0 - 1, 2 * ys / h0 - 1
    grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), -1)
    return grid.astype(np.float32)
