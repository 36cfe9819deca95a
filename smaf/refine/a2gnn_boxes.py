"""Box supervision for A2GNN (related-methods.md §8, box variant): box annotations, box seeds, and boxes derived
from masks for benchmarking.

The reference ships no box-seed code (its seeds are downloads made with GrabCut-style merging); this module is
this project's simple, documented replacement. A box is ``Box(cls, x0, y0, x1, y1)``: ``cls`` the class index
0..C-1 (no background), pixel coordinates inclusive, 0-based, in the original image.

Box file format (``<box_dir>/<id>.txt``), one box per line, ``#`` starts a comment::

    # class x0 y0 x1 y1
    14 12 30 140 220
    dog 150 40 300 210          # a class name of the dataset's labels.txt works too

VOC XML annotations (``<box_dir>/<id>.xml``, ``Annotations/`` of VOC) are read too: each ``<object>``'s
``<name>`` and ``<bndbox>`` (VOC's 1-based xmin..ymax, converted to 0-based).

Boxes from masks (:func:`boxes_from_mask`, for benchmarking on sets without box annotations): the tight box of
every 8-connected region of each class of a ground-truth mask (255 ignored). These are not human boxes: they are
tighter than drawn boxes and split an object occluded into several parts into several boxes.

Box seeds (:func:`box_seeds`): 0 (background) outside every box; inside a box its class + 1, the smaller box
winning where boxes overlap. :func:`grabcut_box_seeds` (the stage's default, ``a2gnn.box_seeds: grabcut``) keeps
the class only where OpenCV's GrabCut, started from the box, finds the object, and leaves the rest of the box
unlabelled (255): the GrabCut step of SDI-style box seeds (Khoreva et al. 2017) that the reference's downloaded
seeds came from, without their MCG half. A2GNN's own clean-up of the box interiors happens in the graph training
(the consistency check and the MIL loss, :mod:`smaf.models.a2gnn`).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

IGNORE = 255


class Box(NamedTuple):
    cls: int
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def area(self) -> int:
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)


def _class_index(token: str, class_names: list, where: str) -> int:
    if token.lstrip("-").isdigit():
        index = int(token)
    elif token in class_names:
        index = class_names.index(token)
    else:
        raise ValueError(f"{where}: class {token!r} is neither an index nor a class name "
                         f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
    if not 0 <= index < max(1, len(class_names)):
        raise ValueError(f"{where}: class index {index} is outside 0..{len(class_names) - 1}")
    return index


def _checked(box: Box, where: str, size: tuple | None) -> Box:
    if box.x1 < box.x0 or box.y1 < box.y0:
        raise ValueError(f"{where}: box {tuple(box)[1:]} has x1 < x0 or y1 < y0")
    if size is not None:
        h, w = size
        box = Box(box.cls, max(0, box.x0), max(0, box.y0), min(w - 1, box.x1), min(h - 1, box.y1))
    return box


def read_box_file(path: str | os.PathLike, class_names: list, size: tuple | None = None) -> list[Box]:
    """Boxes of a text box file (module docstring); with ``size`` = (H, W) they are clipped to the image. A bad
    line is a ValueError naming the file and line."""
    boxes = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        where = f"{path}:{number}"
        if len(parts) != 5:
            raise ValueError(f"{where}: expected 'class x0 y0 x1 y1', got {text!r}")
        try:
            x0, y0, x1, y1 = (int(round(float(v))) for v in parts[1:])
        except ValueError:
            raise ValueError(f"{where}: box coordinates must be numbers, got {text!r}") from None
        boxes.append(_checked(Box(_class_index(parts[0], class_names, where), x0, y0, x1, y1), where, size))
    return boxes


def read_voc_xml(path: str | os.PathLike, class_names: list, size: tuple | None = None) -> list[Box]:
    """Boxes of a VOC annotation XML (1-based inclusive coordinates -> 0-based)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path}: not a readable VOC annotation ({err})") from None
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: object {name!r} has no <bndbox>")
        try:
            x0, y0, x1, y1 = (int(round(float(bb.findtext(k)))) - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: object {name!r} has a bad <bndbox>") from None
        boxes.append(_checked(Box(_class_index(name, class_names, str(path)), x0, y0, x1, y1), str(path), size))
    return boxes


def read_boxes(box_dir: str | os.PathLike, image_id: str, class_names: list, size: tuple | None = None) -> list[Box]:
    """The boxes of ``image_id`` from ``box_dir/<id>.txt`` or, when absent, ``box_dir/<id>.xml``."""
    box_dir = Path(box_dir)
    if (box_dir / f"{image_id}.txt").is_file():
        return read_box_file(box_dir / f"{image_id}.txt", class_names, size)
    if (box_dir / f"{image_id}.xml").is_file():
        return read_voc_xml(box_dir / f"{image_id}.xml", class_names, size)
    raise FileNotFoundError(f"no box file for '{image_id}' in '{box_dir}' (expected {image_id}.txt or "
                            f"{image_id}.xml; format in docs/a2gnn.md)")


def write_box_file(path: str | os.PathLike, boxes: list[Box]) -> Path:
    """Write boxes in the text format (class index x0 y0 x1 y1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# class x0 y0 x1 y1\n" + "".join(f"{b.cls} {b.x0} {b.y0} {b.x1} {b.y1}\n" for b in boxes))
    return path


def boxes_from_mask(mask: np.ndarray) -> list[Box]:
    """Tight boxes of the 8-connected regions of each class of a VOC mask (uint8 (H, W): 0 background, c+1
    class c, 255 ignored), ordered by class then by position (top, left)."""
    boxes = []
    for value in np.unique(mask):
        if value == 0 or value == IGNORE:
            continue
        count, _, stats, _ = cv2.connectedComponentsWithStats((mask == value).astype(np.uint8), connectivity=8)
        found = [Box(int(value) - 1, int(x), int(y), int(x + w - 1), int(y + h - 1))
                 for x, y, w, h, _ in stats[1:count]]
        boxes.extend(sorted(found, key=lambda b: (b.y0, b.x0)))
    return boxes


def box_seeds(size: tuple[int, int], boxes: list[Box]) -> np.ndarray:
    """Seed map uint8 (H, W) of boxes: 0 outside every box, the box class + 1 inside (smaller boxes painted last,
    so they win on overlaps)."""
    seeds = np.zeros(tuple(size), np.uint8)
    for b in sorted(boxes, key=lambda b: -b.area):
        seeds[b.y0:b.y1 + 1, b.x0:b.x1 + 1] = b.cls + 1
    return seeds


def grabcut_box_seeds(image: np.ndarray, boxes: list[Box], iterations: int = 5) -> np.ndarray:
    """Seed map uint8 (H, W) of boxes refined by GrabCut: 0 outside every box; inside each box (larger boxes
    first, so smaller ones win on overlaps) its class + 1 where GrabCut (``iterations`` rounds, initialised with
    the box as the rectangle, on the RGB uint8 ``image`` (H, W, 3)) labels the pixel (probably) foreground, 255
    elsewhere in the box. A box GrabCut cannot model (no pixel outside it, fewer than 2 pixels wide or high) or in
    which it finds no foreground keeps its whole interior as the class, as :func:`box_seeds` does."""
    h, w = image.shape[:2]
    seeds = np.zeros((h, w), np.uint8)
    bgr = np.ascontiguousarray(image[..., ::-1])
    for b in sorted(boxes, key=lambda b: -b.area):
        inside = (slice(b.y0, b.y1 + 1), slice(b.x0, b.x1 + 1))
        bw, bh = b.x1 - b.x0 + 1, b.y1 - b.y0 + 1
        fg = None
        if bw >= 2 and bh >= 2 and bw * bh < h * w:
            mask = np.zeros((h, w), np.uint8)
            try:
                cv2.grabCut(bgr, mask, (b.x0, b.y0, bw, bh), np.zeros((1, 65), np.float64),
                            np.zeros((1, 65), np.float64), int(iterations), cv2.GC_INIT_WITH_RECT)
                fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD))[inside]
            except cv2.error:   # e.g. one colour everywhere: nothing to model (fg stays None)
                pass
        if fg is None or not fg.any():
            seeds[inside] = b.cls + 1
        else:
            seeds[inside] = np.where(fg, b.cls + 1, 255).astype(np.uint8)
    return seeds


def box_masks(size: tuple[int, int], boxes: list[Box]) -> np.ndarray:
    """bool (len(boxes), H, W): the pixels of each box."""
    out = np.zeros((len(boxes), *size), bool)
    for i, b in enumerate(boxes):
        out[i, b.y0:b.y1 + 1, b.x0:b.x1 + 1] = True
    return out
