"""Synthetic VOC-layout demo dataset, generated in seconds on a CPU.

    python -m smaf.data.synthetic --out dataset/demo [--seed 0] [--train 200] [--val 60] [--size 128-224]

Each image holds 1-3 objects of a handful of classes on a cluttered background. A class is a shape, a
texture and a colour family together:

    disc (dots, red) | square (stripes, blue) | triangle (checkers, green) | cross (noise, yellow) |
    ring (radial sectors, purple) | star (concentric bands, cyan; only with num_classes=6)

* Colours: each object draws its hue from its class's range (+-15 degrees around the class hue) with random
  saturation and value, so colour is informative but not sufficient: background distractor blobs often take a
  class hue too.
* Sizes: object diameters are log-uniform between 8% and 60% of the image's short side (at least 10 px), so
  one image mixes small and large objects and multi-scale CAM fusion matters. Objects are drawn largest first;
  a placement that would hide more than 30% of an earlier object is retried (then dropped).
* Backgrounds: a colour gradient, low-frequency colour noise, optional random stripes and 1-4 irregular
  (noise-warped) blobs of distractor colours that never form a class shape, plus pixel noise.
* Image sizes: width and height drawn independently from [min_size, max_size] (default 128-224 px).
* Masks (``SegmentationClass/<id>.png``, palette PNG): 0 background, c+1 class c, and 255 on the 2 px band
  where two labels meet (one pixel each side), like VOC's ignored object borders; an object too thin to keep a
  quarter of its pixels outside the band is left unbanded. ``cls_labels.npy`` is derived from the masks, so
  labels and masks always agree, and every visible object is labelled.
* Saliency (``SALImages/<id>.png``, greyscale 0..255) is SYNTHETIC: the foreground mask with some objects partly
  erased (misses; small objects are sometimes dropped entirely), some distractor blobs added (false positives),
  Gaussian-blurred and corrupted with smooth and pixel noise. Real datasets use maps of an off-the-shelf
  saliency model instead (e.g. PFAN maps as distributed by the EPS authors for VOC).

Determinism: every random draw comes from a numpy Generator seeded with (seed, split, index), so an image
depends only on the seed, the size range, the class count and its own index; the same arguments give the
same bytes (PNG and JPEG encoding through PIL with fixed settings are deterministic).

A ``synthetic.json`` manifest records the arguments; re-running with the same arguments on a complete output
is a no-op (``--force`` rewrites).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..io import save_image, save_label_png
from ..runtime import EXIT_EXPECTED_ERROR

GENERATOR_VERSION = 1
MANIFEST = "synthetic.json"
SPLITS = ("train", "val")
MIN_OBJECT_PX = 10            # smallest object diameter: keeps a few interior pixels inside the ignore band
SIZE_RANGE = (0.08, 0.60)     # object diameter / image short side (log-uniform)
OBJECTS_PER_IMAGE = ((1, 2, 3), (0.4, 0.4, 0.2))
MAX_HIDDEN_FRACTION = 0.3     # a new object may cover at most this much of an earlier object's visible area
SUPERSAMPLE = 3               # coverage is computed on a 3x3 sub-pixel grid (anti-aliased edges)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ClassSpec:
    """One synthetic class: a shape, a texture of two tones and a hue (degrees)."""

    name: str
    shape: str
    texture: str
    hue: float


CLASS_SPECS = (
    ClassSpec("disc", "disc", "dots", 0.0),
    ClassSpec("square", "square", "stripes", 225.0),
    ClassSpec("triangle", "triangle", "checkers", 120.0),
    ClassSpec("cross", "cross", "noise", 52.0),
    ClassSpec("ring", "ring", "sectors", 285.0),
    ClassSpec("star", "star", "bands", 180.0),
)
HUE_JITTER = 15.0             # degrees; the closest class hues are 52 apart, so families never overlap


def class_names(num_classes: int = 5) -> list[str]:
    """Foreground class names of a synthetic set with ``num_classes`` classes."""
    _check_num_classes(num_classes)
    return [spec.name for spec in CLASS_SPECS[:num_classes]]


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= len(CLASS_SPECS):
        raise ValueError(f"num_classes must be 1..{len(CLASS_SPECS)} (classes: "
                         f"{', '.join(s.name for s in CLASS_SPECS)}), got {num_classes}")


# ------------------------------------------------------------------------------------------- colours
def _hsv_rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    """HSV (hue in degrees) -> float32 RGB (3,) in 0..255."""
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, float(np.clip(sat, 0, 1)), float(np.clip(val, 0, 1)))
    return np.array([r, g, b], np.float32) * 255.0


def _class_tones(rng: np.random.Generator, spec: ClassSpec) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB tones of one object: a main colour and a darker/shifted texture colour of the same family."""
    hue = spec.hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
    sat, val = rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.95)
    main = _hsv_rgb(hue, sat, val)
    second = _hsv_rgb(hue + rng.uniform(-8, 8), sat * rng.uniform(0.5, 0.9), val * rng.uniform(0.35, 0.6))
    return main, second


def _random_colour(rng: np.random.Generator, max_sat: float = 0.6) -> np.ndarray:
    return _hsv_rgb(rng.uniform(0, 360), rng.uniform(0.0, max_sat), rng.uniform(0.25, 0.9))


# ------------------------------------------------------------------------------------------- geometry
def _local_coords(ys: np.ndarray, xs: np.ndarray, cx: float, cy: float, radius: float, angle: float,
                  aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Object frame: pixel coordinates (broadcastable arrays) -> (u, v), rotated by ``angle`` and divided by the
    radius (and the aspect ratio along u), so the shape tests below work on the unit scale."""
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u = (c * dx + s * dy) / (radius * aspect)
    v = (-s * dx + c * dy) / radius
    return u, v


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of a unit-size shape in its own frame (everything fits in the unit disc * 1.15)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":     # equilateral, circumradius 1: three half-planes at the inradius 0.5
        inside = np.ones(np.broadcast(u, v).shape, bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= (-np.cos(a) * u - np.sin(a) * v) <= 0.5
        return inside
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.55 ** 2)
    if shape == "star":         # five points: polar radius between 0.45 (notches) and 1.05 (tips)
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        tri = np.abs(((theta * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2          # 1 at a tip, 0 at a notch
        return rho <= 0.45 + 0.6 * tri
    raise ValueError(f"unknown shape {shape}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mixing weight (H, W) in [0, 1] of the second tone. Periods are in object units, so the texture scales
    with the object (a small disc has a few large dots, not many tiny ones)."""
    if texture == "dots":
        p = 0.4
        fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return (fu * fu + fv * fv <= 0.28 ** 2).astype(np.float32)
    if texture == "stripes":
        return (np.sin(2 * np.pi * u / 0.35) > 0).astype(np.float32)
    if texture == "checkers":
        return ((np.floor(u / 0.35) + np.floor(v / 0.35)) % 2).astype(np.float32)
    if texture == "noise":
        noise = rng.random(u.shape).astype(np.float32)
        return cv2.GaussianBlur(noise, (3, 3), 0.8) * 1.6 - 0.3
    if texture == "sectors":
        return (np.sin(np.arctan2(v, u) * 8) > 0).astype(np.float32)
    if texture == "bands":
        return (np.sin(2 * np.pi * np.hypot(u, v) / 0.25) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture}")


def _supersampled_coverage(shape: str, box: tuple[int, int, int, int], frame: dict) -> np.ndarray:
    """Fraction (h, w) float32 of each pixel of ``box`` = (y0, y1, x0, x1) inside the shape."""
    y0, y1, x0, x1 = box
    ss = SUPERSAMPLE
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    u, v = _local_coords(ys[:, None], xs[None, :], **frame)
    inside = _shape_inside(shape, u, v).astype(np.float32)
    return inside.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 0) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid upsampled bicubically to (h, w[, channels])."""
    shape = (cells, cells, channels) if channels else (cells, cells)
    coarse = rng.uniform(-1, 1, shape).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


# ------------------------------------------------------------------------------------------ background
def _background(rng: np.random.Generator, h: int, w: int, num_classes: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cluttered background: float32 RGB (h, w, 3) in 0..255 and the masks (h, w) bool of its distractor blobs."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx / w + np.sin(direction) * yy / h)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    a, b = _random_colour(rng), _random_colour(rng)
    img = a + (b - a) * ramp[..., None]
    img += 35.0 * _smooth_noise(rng, h, w, int(rng.integers(3, 7)), 3)

    if rng.random() < 0.5:      # random stripes over the whole image or a band of it
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 18)
        phase = np.cos(angle) * xx + np.sin(angle) * yy
        stripes = (np.sin(2 * np.pi * phase / period) > 0.3).astype(np.float32)
        if rng.random() < 0.5:
            centre, half = rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.35)
            across = -np.sin(angle) * xx / w + np.cos(angle) * yy / h
            across = (across - across.min()) / max(float(np.ptp(across)), 1e-6)
            stripes *= np.abs(across - centre) < half
        alpha = rng.uniform(0.25, 0.55) * stripes[..., None]
        img = img * (1 - alpha) + _random_colour(rng, 0.9) * alpha

    blobs = []
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.08, 0.3) * w, rng.uniform(0.08, 0.3) * h
        # a noise-warped ellipse: its outline wobbles, so it never reads as a disc, square or any class shape
        warp = 0.9 * _smooth_noise(rng, h, w, int(rng.integers(4, 9)))
        blob = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + warp <= 1.0
        if not blob.any():
            continue
        if rng.random() < 0.45:  # a class hue on a wrong shape: colour alone must not decide the class
            spec = CLASS_SPECS[int(rng.integers(num_classes))]
            colour = _hsv_rgb(spec.hue + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.5, 0.95),
                              rng.uniform(0.5, 0.95))
        else:
            colour = _random_colour(rng, 0.9)
        shade = 1.0 + 0.15 * _smooth_noise(rng, h, w, 5)[..., None]
        img = np.where(blob[..., None], colour * shade, img)
        blobs.append(blob)
    return img, blobs


# -------------------------------------------------------------------------------------------- objects
def _place_objects(rng: np.random.Generator, img: np.ndarray,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paint 1-3 objects onto ``img`` (in place). Returns the label map (h, w) uint8 (0 bg, c+1 class c, no
    ignore band yet), the owner map (h, w) int16 (index of the object visible at each pixel, -1 on background)
    and per drawn object ``{class, radius}``."""
    h, w = img.shape[:2]
    short = min(h, w)
    count = int(rng.choice(OBJECTS_PER_IMAGE[0], p=OBJECTS_PER_IMAGE[1]))
    lo, hi = np.log(SIZE_RANGE[0]), np.log(SIZE_RANGE[1])
    diameters = sorted((max(MIN_OBJECT_PX, float(np.exp(rng.uniform(lo, hi))) * short) for _ in range(count)),
                       reverse=True)   # largest first: small objects end up on top, so they stay visible
    label = np.zeros((h, w), np.uint8)
    owner = np.full((h, w), -1, np.int16)      # index of the object visible at each pixel
    drawn: list[dict] = []
    for diameter in diameters:
        cls = int(rng.integers(num_classes))
        spec = CLASS_SPECS[cls]
        radius = diameter / 2
        for _attempt in range(20):
            frame = dict(cx=rng.uniform(0.7 * radius, w - 0.7 * radius), cy=rng.uniform(0.7 * radius, h - 0.7 * radius),
                         radius=radius, angle=rng.uniform(0, 2 * np.pi), aspect=rng.uniform(0.85, 1.15))
            reach = 1.2 * radius * 1.15
            box = (max(0, int(frame["cy"] - reach)), min(h, int(np.ceil(frame["cy"] + reach))),
                   max(0, int(frame["cx"] - reach)), min(w, int(np.ceil(frame["cx"] + reach))))
            coverage = _supersampled_coverage(spec.shape, box, frame)
            inside = coverage >= 0.5
            if inside.sum() < 0.5 * np.pi * (MIN_OBJECT_PX / 2) ** 2:
                continue
            under = owner[box[0]:box[1], box[2]:box[3]][inside]
            hidden_ok = all(np.count_nonzero(under == k) <= MAX_HIDDEN_FRACTION * np.count_nonzero(owner == k)
                            for k in range(len(drawn)))
            if hidden_ok:
                break
        else:
            continue                          # no room left for this object: drop it
        y0, y1, x0, x1 = box
        ys, xs = np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5
        u, v = _local_coords(ys[:, None], xs[None, :], **frame)
        main, second = _class_tones(rng, spec)
        mix = np.clip(_texture(spec.texture, u, v, rng), 0, 1)[..., None]
        shading = (1.0 + 0.12 * np.clip(u, -1.2, 1.2) * rng.choice((-1, 1)))[..., None]  # a little lighting
        colour = (main * (1 - mix) + second * mix) * shading
        alpha = coverage[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
        label[y0:y1, x0:x1][inside] = cls + 1
        owner[y0:y1, x0:x1][inside] = len(drawn)
        drawn.append({"class": cls, "radius": radius})
    return label, owner, drawn


def _ignore_band(label: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Copy of ``label`` with 255 wherever a 3x3 neighbourhood holds two labels (a 2 px band on every border).

    An object so thin that less than a quarter of it survives outside the band (a small ring) keeps all its
    pixels (the band then lies outside it only): every visible object keeps a readable mask and, through the
    mask, its image-level label.
    """
    kernel = np.ones((3, 3), np.uint8)
    edge = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    out = label.copy()
    out[edge] = 255
    for k in range(int(owner.max()) + 1):
        pixels = owner == k
        if np.count_nonzero(out[pixels] != 255) < 0.25 * np.count_nonzero(pixels):
            out[pixels] = label[pixels]
    return out


def _saliency(rng: np.random.Generator, label: np.ndarray, owner: np.ndarray, drawn: list[dict],
              blobs: list[np.ndarray]) -> np.ndarray:
    """Synthetic saliency map uint8 (h, w): corrupted, blurred foreground (see the module docstring)."""
    h, w = label.shape
    sal = (label > 0).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for k, obj in enumerate(drawn):
        in_obj = owner == k
        if not in_obj.any():
            continue
        if obj["radius"] < 0.08 * min(h, w) and rng.random() < 0.25:
            sal[in_obj] = 0.0                 # small objects are what real saliency models miss most
        elif rng.random() < 0.35:             # partial miss: a disc-shaped hole over part of the object
            py, px = np.argwhere(in_obj)[int(rng.integers(np.count_nonzero(in_obj)))]
            r = rng.uniform(0.35, 0.7) * obj["radius"]
            sal[in_obj & ((yy - py) ** 2 + (xx - px) ** 2 <= r * r)] = rng.uniform(0.0, 0.3)
    for blob in blobs:                        # false positives on distractors
        if rng.random() < 0.3:
            sal[blob & (label == 0)] = rng.uniform(0.5, 1.0)
    sigma = rng.uniform(1.0, 2.5)
    sal = cv2.GaussianBlur(sal, (0, 0), sigma)
    sal = sal * rng.uniform(0.75, 1.0) + 0.08 * _smooth_noise(rng, h, w, 6) + rng.normal(0, 0.03, (h, w))
    return (np.clip(sal, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_sample(rng: np.random.Generator, height: int, width: int, num_classes: int = 5):
    """One synthetic sample: RGB uint8 (H, W, 3), mask uint8 (H, W) (0 bg, c+1, 255 band) and saliency uint8
    (H, W)."""
    img, blobs = _background(rng, height, width, num_classes)
    label, owner, drawn = _place_objects(rng, img, num_classes)
    img = img + rng.normal(0, 4.0, img.shape)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    saliency = _saliency(rng, label, owner, drawn, blobs)
    return image, _ignore_band(label, owner), saliency


# ------------------------------------------------------------------------------------------- writing
def _sample_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


_ID_PATTERN = re.compile(r"^(train|val)_\d{5}\.(jpg|png)$")


def _manifest_args(num_train, num_val, seed, min_size, max_size, num_classes) -> dict:
    return {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
            "min_size": min_size, "max_size": max_size, "num_classes": num_classes}


def _is_complete(out: Path, args: dict) -> bool:
    """True when ``out`` holds a finished synthetic set written with exactly ``args``."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not manifest.get("complete") or manifest.get("args") != args:
        return False
    files = [out / "cls_labels.npy", out / "labels.txt", out / "README.md"]
    for split, n in zip(SPLITS, (args["num_train"], args["num_val"])):
        files.append(out / "ImageSets" / "Segmentation" / f"{split}.txt")
        for i in range(n):
            sid = _sample_id(split, i)
            files += [out / "JPEGImages" / f"{sid}.jpg", out / "SegmentationClass" / f"{sid}.png",
                      out / "SALImages" / f"{sid}.png"]
    return all(f.is_file() for f in files)


def _readme(args: dict, names: list[str]) -> str:
    return f"""# Synthetic demo dataset (NOT real data)

Generated by `python -m smaf.data.synthetic` (seed {args['seed']}, {args['num_train']} train + {args['num_val']} val
images, sides {args['min_size']}-{args['max_size']} px). VOC layout, so every smaf stage reads it like VOC 2012.

- Classes ({len(names)}): {', '.join(names)}. Each class is a shape + texture + colour family; background
  distractor blobs reuse class colours, so colour alone is not enough. Objects span 8%-60% of the short side.
- `JPEGImages/<id>.jpg` RGB images; `SegmentationClass/<id>.png` palette masks (0 background, c+1 class c,
  255 on the 2 px band where two labels meet, ignored by mIoU).
- `SALImages/<id>.png`: SYNTHETIC saliency maps: the foreground mask with partial misses and false-positive
  blobs, blurred and noised. Real datasets use an off-the-shelf saliency model (e.g. PFAN maps, as in EPS).
- `cls_labels.npy`: pickled dict `{{id: float32[{len(names)}]}}`, derived from the masks; `labels.txt`: `background`
  then the class names; `ImageSets/Segmentation/{{train,val}}.txt`: bare ids.

Numbers measured on this set say the pipeline runs end to end; they say nothing about real-image accuracy.
"""


def _remove_previous(out: Path) -> None:
    """Delete sample files this generator wrote earlier (and only those), so a smaller rerun leaves no strays."""
    for sub in ("JPEGImages", "SegmentationClass", "SALImages"):
        folder = out / sub
        if folder.is_dir():
            for f in folder.iterdir():
                if _ID_PATTERN.match(f.name):
                    f.unlink()


def make_synthetic_dataset(out, num_train: int = 200, num_val: int = 60, seed: int = 0, min_size: int = 128,
                           max_size: int = 224, num_classes: int = 5, force: bool = False,
                           verbose: bool = False) -> Path:
    """Write a synthetic VOC-layout dataset to ``out`` (see the module docstring) and return ``out`` as a Path.

    Skips the work when ``out`` already holds a complete set written with the same arguments (unless
    ``force``). Refuses to write into a non-empty folder that is not a synthetic set, unless ``force``.
    """
    _check_num_classes(num_classes)
    if num_train < 1 or num_val < 1:      # an empty split list is an error for the loaders
        raise ValueError(f"need num_train >= 1 and num_val >= 1, got {num_train} and {num_val}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size} and {max_size}")
    out = Path(out)
    args = _manifest_args(num_train, num_val, seed, min_size, max_size, num_classes)
    say = print if verbose else (lambda *a, **k: None)
    if not force and _is_complete(out, args):
        say(f"{out}: complete synthetic set with the same arguments already there; skipping (--force rewrites)")
        return out
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not force:
        raise FileExistsError(f"'{out}' exists, is not empty and is not a synthetic set; pick another --out or "
                              f"pass --force to write into it anyway")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # the manifest goes first (complete: false) so an interrupted run is recognised as ours and rewritten
    (out / MANIFEST).write_text(json.dumps({"generator": "smaf.data.synthetic", "complete": False, "args": args},
                                           indent=1))
    _remove_previous(out)
    names = class_names(num_classes)
    labels: dict[str, np.ndarray] = {}
    class_counts = np.zeros(num_classes, np.int64)
    split_dir = out / "ImageSets" / "Segmentation"
    split_dir.mkdir(parents=True, exist_ok=True)
    for split_code, (split, n) in enumerate(zip(SPLITS, (num_train, num_val))):
        ids = []
        for i in range(n):
            sid = _sample_id(split, i)
            # one generator per sample: an image depends on (seed, split, index) only, not on the split sizes
            rng = np.random.default_rng([seed, split_code, i])
            height, width = (int(x) for x in rng.integers(min_size, max_size + 1, 2))
            image, mask, saliency = render_sample(rng, height, width, num_classes)
            save_image(out / "JPEGImages" / f"{sid}.jpg", image)
            save_label_png(out / "SegmentationClass" / f"{sid}.png", mask)
            save_image(out / "SALImages" / f"{sid}.png", saliency)
            present = np.unique(mask)
            vec = np.zeros(num_classes, np.float32)
            vec[present[(present > 0) & (present < 255)].astype(int) - 1] = 1.0
            labels[sid] = vec
            class_counts += vec.astype(np.int64)
            ids.append(sid)
        (split_dir / f"{split}.txt").write_text("".join(f"{sid}\n" for sid in ids))

    with open(out / "cls_labels.npy", "wb") as fh:
        np.save(fh, labels, allow_pickle=True)
    (out / "labels.txt").write_text("\n".join(["background", *names]) + "\n")
    (out / "README.md").write_text(_readme(args, names))
    (out / MANIFEST).write_text(json.dumps({"generator": "smaf.data.synthetic", "complete": True, "args": args},
                                           indent=1))
    multi = sum(int(v.sum() >= 2) for v in labels.values())
    say(f"wrote {num_train} train + {num_val} val synthetic images ({min_size}-{max_size} px sides, seed {seed}) "
        f"to {out} in {time.perf_counter() - start:.1f} s")
    say("  JPEGImages/*.jpg, SegmentationClass/*.png (255 = border band), SALImages/*.png (SYNTHETIC saliency), "
        "cls_labels.npy, labels.txt, ImageSets/Segmentation/{train,val}.txt, README.md")
    say(f"  images per class: {', '.join(f'{n} {c}' for n, c in zip(names, class_counts))}; "
        f"multi-label images: {multi}/{len(labels)}")
    return out


def _parse_size(text: str) -> tuple[int, int]:
    """``"160"`` -> (160, 160); ``"128-224"`` / ``"128x224"`` / ``"128:224"`` -> (128, 224)."""
    parts = re.split(r"[-x:,]", text.strip().lower())
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text}: expected N or MIN-MAX, e.g. 128-224") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 16 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"--size {text}: expected N or MIN-MAX with 16 <= MIN <= MAX")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic VOC-layout demo dataset (images, masks, "
                                                 "synthetic saliency, labels, split lists).")
    parser.add_argument("--out", default="dataset/demo", help="output folder (default dataset/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=200, help="number of training images")
    parser.add_argument("--val", type=int, default=60, help="number of validation images")
    parser.add_argument("--size", type=_parse_size, default=(128, 224), metavar="MIN-MAX",
                        help="range of each image side in px, drawn independently for W and H (N = all N x N); "
                             "default 128-224")
    parser.add_argument("--num-classes", type=int, default=5, help=f"1..{len(CLASS_SPECS)} (default 5)")
    parser.add_argument("--force", action="store_true", help="rewrite even if a complete set is already there")
    args = parser.parse_args(argv)
    try:
        make_synthetic_dataset(args.out, args.train, args.val, args.seed, args.size[0], args.size[1],
                               args.num_classes, force=args.force, verbose=True)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_EXPECTED_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
