"""Segment any images with a trained stage-4 network (``python -m smaf.predict``).

    python -m smaf.predict --checkpoint work_dirs/voc12/train_seg/final.pth --images photos/ --out predictions/
    python -m smaf.predict --checkpoint final.pth --images a.jpg b.png --out out/ --base-long 320 --crf

``--images`` takes folders (their image files, not recursive) and files, of any size and format PIL reads.
For each image ``<stem>`` it writes, at the image's own size:

    <out>/<stem>.png             the predicted label map (palette PNG, VOC numbering: 0 background, c+1 class c)
    <out>/no_crf/<stem>.png      with --crf: the prediction before the CRF (<out>/<stem>.png is after it)
    <out>/overlays/<stem>.jpg    image | prediction (| + CRF) | the classes found, with their names
    <out>/predictions.json       per image: source file, size, the classes found and their pixel shares

The class names come from the checkpoint (stage 4 stores the dataset's names in its meta). Inference is the
stage-4 path (:func:`smaf.seg.inference.segment_batch`: scales x flip averaged on the device; ``--base-long``
resizes large photos for the network first, the masks stay at the image size). Images whose PNG exists are
skipped (``--overwrite`` redoes them). Bad inputs (missing files, unreadable images, two inputs with one stem,
a checkpoint that is no segmentation network) stop before any work with one ``error:`` line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .runtime import StageError, expected_errors

DEFAULT_SCALES = (0.5, 0.75, 1.0)


class PredictError(StageError):
    """A bad input of ``python -m smaf.predict``; the message names the file or option and the fix."""


def find_images(sources) -> list[tuple[str, Path]]:
    """``(stem, path)`` of every image of ``sources`` (folders: their image files sorted by name, not recursive;
    files as given), each readable from its header. Raises :class:`PredictError` (one line) for a missing
    source, a folder without images, an unreadable image or two images with the same stem."""
    from PIL import Image

    from .data.voc import IMAGE_SUFFIXES

    suffixes = {s.lower() for s in IMAGE_SUFFIXES} | {".bmp", ".tif", ".tiff", ".webp"}
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise PredictError(f"--images folder '{path}' holds no image files ({', '.join(sorted(suffixes))})")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise PredictError(f"--images: '{path}' is neither a file nor a folder")
    if not found:
        raise PredictError("--images names no images")
    by_stem: dict[str, Path] = {}
    for path in found:
        if path.stem in by_stem and by_stem[path.stem].resolve() != path.resolve():
            raise PredictError(f"two input images share the name '{path.stem}' ({by_stem[path.stem]} and {path}): "
                               f"their outputs would overwrite each other; predict them into separate --out folders")
        by_stem.setdefault(path.stem, path)
    for path in by_stem.values():
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - the header is read on open
        except (OSError, SyntaxError, ValueError) as err:
            raise PredictError(f"'{path}' is not an image PIL can read ({' '.join(str(err).split())[:120]}): remove "
                               f"it from --images") from None
    return list(by_stem.items())


def class_names_of(spec: dict) -> list[str]:
    """The foreground class names a stage-4 checkpoint records (``class 1``.. when it records none)."""
    args = spec.get("args", {})
    names = args.get("class_names")
    return [str(n) for n in names] if names else [f"class {c + 1}" for c in range(int(args.get("num_classes", 0)))]


def load_segmentation_model(path, device):
    """The stage-4 network of the checkpoint ``path`` on ``device`` (an inference copy) and its spec; a file that
    is missing, unreadable or not a segmentation network is one line (:class:`~smaf.checkpoint.CheckpointError`
    or :class:`PredictError`)."""
    from .checkpoint import load_model
    from .models.afa import AFA_ARCHITECTURES
    from .models.deeplab import SEG_ARCHITECTURES
    from .models.fold import inference_copy

    model, spec = load_model(path, producer="stage 4 (bash script/train_seg.sh)")
    segmenters = SEG_ARCHITECTURES + AFA_ARCHITECTURES
    if spec["arch"] not in segmenters:
        raise PredictError(f"--checkpoint '{path}' holds a {spec['arch']} network, not a segmentation network "
                           f"({', '.join(segmenters)}): give the final.pth of stage 4 (train_seg) or of AFA "
                           f"(train_afa)")
    model, _ = inference_copy(model.to(device), device)
    return model, spec


def summarise(items, png_dir: Path, class_names) -> dict:
    """``{stem: {'source', 'size': [H, W], 'classes': {name: share of the pixels in %}}}`` from the written PNGs."""
    from .io import load_label_png

    names = ["background"] + list(class_names)
    out = {}
    for stem, path in items:
        label = load_label_png(png_dir / f"{stem}.png")
        values, counts = np.unique(label, return_counts=True)
        shares = {names[v] if v < len(names) else f"value {v}": round(100.0 * c / label.size, 2)
                  for v, c in zip(values.tolist(), counts.tolist())}
        out[stem] = {"source": str(path), "size": list(label.shape), "classes": shares}
    return out


def predict(checkpoint, images, out, scales=DEFAULT_SCALES, flip: bool = True, base_long: int = 0,
            crf: bool = False, crf_workers: int = 0, batch_size: int = 4, workers: int = 2, device: str = "auto",
            amp: str = "none", overlays: bool = True, overwrite: bool = False, logger=None) -> dict:
    """Segment ``images`` (files and folders, see :func:`find_images`) with the stage-4 ``checkpoint`` into
    ``out`` (module docstring). Returns ``{'out', 'images', 'skipped', 'images_per_s', 'seconds',
    'class_names'}``."""
    import logging

    from . import dist
    from .runtime import available_cores
    from .seg.writer import SegOutputs, segment_items

    logger = logger or logging.getLogger("smaf.predict")
    scales = [float(s) for s in scales]
    if not scales or min(scales) <= 0:
        raise PredictError(f"--scales {scales}: expected positive numbers, e.g. 0.5,0.75,1.0")
    if int(batch_size) < 1 or int(base_long) < 0 or int(workers) < 0:
        raise PredictError("--batch-size must be >= 1, --base-long and --workers >= 0")
    items = find_images(images)
    try:
        torch_device = dist.select_device(device)
    except RuntimeError as err:
        raise PredictError(f"--device {device}: {err}") from None
    model, spec = load_segmentation_model(checkpoint, torch_device)
    names = class_names_of(spec)
    out = Path(out)
    outputs = SegOutputs(out / "no_crf" if crf else out, out if crf else None, out / "overlays" if overlays else None)
    if overwrite:
        for stem, _ in items:
            for folder in (outputs.png_dir, outputs.crf_dir):
                if folder is not None:
                    (Path(folder) / f"{stem}.png").unlink(missing_ok=True)
    logger.info("predicting %d images with %s (%s, classes: %s) on %s", len(items), checkpoint, spec["arch"],
                ", ".join(names), torch_device)
    start = time.perf_counter()
    speed = segment_items(model, items, outputs, torch_device, logger, scales, flip, int(base_long), "cv2", amp,
                          int(workers), int(batch_size), None, int(crf_workers) or available_cores(),
                          overlay_names=[stem for stem, _ in items], class_names=names, desc="predict")
    summary = summarise(items, out, names)
    from .io import atomic_save

    text = json.dumps({"checkpoint": str(checkpoint), "class_names": names, "images": summary}, indent=2)
    atomic_save(out / "predictions.json", lambda tmp: Path(tmp).write_text(text + "\n"))
    return {"out": out, "images": speed["images"], "skipped": speed["skipped"], "images_per_s": speed["images_per_s"],
            "seconds": time.perf_counter() - start, "class_names": names}


def _scales(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,0.75,1.0, got {text!r}") \
            from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smaf.predict",
                                     description="Segment any images with a trained stage-4 network: palette PNGs "
                                                 "at each image's size, overlays and a JSON summary.")
    parser.add_argument("--checkpoint", required=True, help="stage-4 final.pth (train_seg)")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scales", type=_scales, default=list(DEFAULT_SCALES),
                        help="comma-separated input scales (default 0.5,0.75,1.0)")
    parser.add_argument("--no-flip", action="store_true", help="do not add the horizontally flipped pass")
    parser.add_argument("--base-long", type=int, default=0,
                        help="resize the long side to this before scaling (0 = original size; e.g. 320 for large "
                             "photos on a CPU); the masks stay at the image size")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF (DeepLab's constants)")
    parser.add_argument("--crf-workers", type=int, default=0, help="CRF processes (0 = all cores)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per loader batch (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="image loading workers (default 2)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    parser.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"), help="autocast (default none)")
    parser.add_argument("--no-overlays", action="store_true", help="write no overlay pictures")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose PNG exists")
    args = parser.parse_args(argv)
    from .runtime import get_logger

    with expected_errors():
        result = predict(args.checkpoint, args.images, args.out, args.scales, not args.no_flip, args.base_long,
                         args.crf, args.crf_workers, args.batch_size, args.workers, args.device, args.amp,
                         not args.no_overlays, args.overwrite, logger=get_logger("predict"))
        rate = f", {result['images_per_s']:.2f} images/s" if result["images"] else ""
        print(f"wrote {result['images']} predictions to {result['out']} ({result['skipped']} already there{rate}; "
              f"summary in {result['out'] / 'predictions.json'})")


if __name__ == "__main__":
    main()
