"""Check a VOC-layout dataset root and list exactly what is missing or inconsistent
(``python -m smaf.data.prepare --root DIR``); optionally rebuild ``cls_labels.npy`` from the masks.

What is checked (one :class:`Defect` per kind, with counts and the first few ids):

==========================  =============================================================================
kind                        meaning
==========================  =============================================================================
``root_missing``            the root folder does not exist (nothing else is checked)
``images_dir_missing``      no ``JPEGImages/`` folder
``no_split_lists``          no list in ``ImageSets/Segmentation/*.txt``, ``<root>/*.txt`` or ``--list``
``list_unreadable``         a split list is missing or empty
``ids_without_image``       ids of a split list without an image file
``unreadable_images``       image files that fail to decode (see "image decoding" below)
``class_names``             ``labels.txt`` lists no foreground class
``labels_missing``          no ``cls_labels.npy``
``labels_unreadable``       ``cls_labels.npy`` is not a pickled dict ``{id: float32[C]}``
``ids_without_labels``      ids of the split lists without an entry in ``cls_labels.npy``
``label_length``            label vectors whose length is not C (the number of names in ``labels.txt``)
``unreadable_masks``        mask PNGs that fail to decode (or are colour PNGs, not class indices)
``mask_values``             masks with values outside 0..C and 255
``mask_size``               masks whose size differs from their image's
``mask_class_not_labelled`` a class is present in the mask but not in the image-level label
``labelled_not_in_mask``    a class is in the image-level label but absent from the mask
``saliency_missing``        the saliency folder exists but lacks ``<id>.png`` for ids of the lists
==========================  =============================================================================

Ids that are checked: the union of all split lists found (every image when there is none) for images,
labels and saliency; every mask of the mask folder for masks (they are what ``--rebuild-labels`` reads).

Image decoding is the slow check (a few ms per image): by default it runs when at most
:data:`AUTO_DECODE_LIMIT` (5000) images are to be checked and is skipped above that with a note;
``--check-images`` forces it, ``--no-check-images`` skips it.

Exit code 0 when clean ("layout OK: ..."), 1 when there is a defect.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from ..io import atomic_save, load_image, load_label_png
from ..runtime import EXIT_EXPECTED_ERROR
from .voc import (
    IMAGE_SUFFIXES,
    DatasetError,
    load_class_names,
    load_cls_labels,
    read_id_list,
)

AUTO_DECODE_LIMIT = 5000
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")  # same preference as VOCLayout
SHOW = 5  # ids shown per defect line


@dataclass
class Defect:
    """One kind of defect: ``kind`` (see the module table), a one-line ``message`` (count, first ids, fix)
    and the affected ``ids`` (all of them)."""

    kind: str
    message: str
    ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class LayoutReport:
    """Result of :func:`inspect_layout`: ``defects`` and ``info`` lines (counts of what was found)."""

    root: Path
    defects: list[Defect] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.defects

    def kinds(self) -> list[str]:
        return [d.kind for d in self.defects]

    def summary(self) -> str:
        """``layout OK: ...`` or ``N defect kinds in ROOT``, one line."""
        if self.ok:
            return "layout OK: " + "; ".join(self.info)
        return f"{len(self.defects)} kind(s) of defect in '{self.root}' (see above)"


@dataclass
class MaskScan:
    """Per mask id: ``hist`` int64 (256,) pixel counts of each value and ``shape`` (H, W); ``unreadable``
    maps ids to the error message."""

    mask_dir: Path | None
    hist: dict[str, np.ndarray] = field(default_factory=dict)
    shape: dict[str, tuple[int, int]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)


def _first(ids: Sequence[str], n: int = SHOW) -> str:
    shown = ", ".join(ids[:n])
    return shown + (", ..." if len(ids) > n else "")


def _map_threads(fn, items: Sequence, workers: int | None) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, int(workers or os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


def find_mask_dir(root: str | os.PathLike) -> Path | None:
    """``<root>/SegmentationClassAug`` or ``<root>/SegmentationClass`` (first that exists), else None."""
    return next((Path(root) / d for d in MASK_DIRS if (Path(root) / d).is_dir()), None)


def find_split_lists(root: str | os.PathLike, extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Split lists of a root: ``ImageSets/Segmentation/*.txt``, ``<root>/*.txt`` (not ``labels.txt``) and
    ``extra`` (kept even when missing, so that the check reports them), without duplicates."""
    root = Path(root)
    found = sorted((root / "ImageSets" / "Segmentation").glob("*.txt"))
    found += sorted(p for p in root.glob("*.txt") if p.name.lower() not in ("labels.txt", "readme.txt"))
    found += [Path(p) for p in extra]
    unique, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def image_files(image_dir: Path) -> dict[str, Path]:
    """``{id: path}`` of the image files of a folder (``.jpg`` preferred when an id has several)."""
    out: dict[str, Path] = {}
    if not image_dir.is_dir():
        return out
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    for p in image_dir.iterdir():
        if p.suffix in rank and (p.stem not in out or rank[p.suffix] < rank[out[p.stem].suffix]):
            out[p.stem] = p
    return out


def scan_masks(mask_dir: Path | None, workers: int | None = None) -> MaskScan:
    """Read every ``<mask_dir>/*.png`` once: value histogram and size per id (threads)."""
    scan = MaskScan(mask_dir)
    if mask_dir is None:
        return scan
    paths = sorted(mask_dir.glob("*.png"))

    def one(path: Path):
        try:
            mask = load_label_png(path)
        except ValueError as err:
            return path.stem, None, str(err)
        return path.stem, (np.bincount(mask.reshape(-1), minlength=256), mask.shape), None

    for image_id, found, error in _map_threads(one, paths, workers):
        if error is not None:
            scan.unreadable[image_id] = " ".join(error.split())
        else:
            scan.hist[image_id], scan.shape[image_id] = found
    return scan


def mask_label_vector(hist: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (C,) image-level label from a mask value histogram: class c present if any pixel == c+1."""
    return (hist[1:num_classes + 1] > 0).astype(np.float32)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(H, W) from the file header only (no decoding); None when unreadable."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (OSError, SyntaxError, ValueError):
        return None


def inspect_layout(root: str | os.PathLike, lists: Iterable[str | os.PathLike] = (),
                   cls_labels: str | os.PathLike | None = None, labels_txt: str | os.PathLike | None = None,
                   saliency_dir: str = "SALImages", check_images: bool | None = None,
                   workers: int | None = None, mask_scan: MaskScan | None = None) -> LayoutReport:
    """Check a VOC-layout root (see the module docstring for the defect kinds).

    Args:
        root: dataset folder. lists: extra split lists (besides those found in the root).
        cls_labels: image-level labels file (default ``<root>/cls_labels.npy``).
        labels_txt: class names (default ``<root>/labels.txt``; VOC's 20 classes when absent).
        saliency_dir: saliency folder, relative to root or absolute (checked only when it exists).
        check_images: decode every checked image: True, False, or None = only when at most
            :data:`AUTO_DECODE_LIMIT` images are checked.
        workers: threads for reading files (default ``os.cpu_count()``).
        mask_scan: a :func:`scan_masks` result to reuse (else the masks are read here).

    Returns:
        A :class:`LayoutReport` (``defects`` empty when the layout is consistent).
    """
    root = Path(root)
    report = LayoutReport(root)
    defects, info = report.defects, report.info
    if not root.is_dir():
        defects.append(Defect("root_missing", f"dataset root '{root}' does not exist: fix --root (data.root)"))
        return report

    # images
    image_dir = root / "JPEGImages"
    images = image_files(image_dir)
    if not image_dir.is_dir():
        defects.append(Defect("images_dir_missing", f"'{image_dir}' not found: a VOC-layout root needs "
                                                    f"JPEGImages/<id>.jpg (is --root the right folder?)"))
    else:
        info.append(f"{len(images)} images")

    # split lists
    list_ids: dict[str, list[str]] = {}
    unreadable_lists = []
    for path in find_split_lists(root, lists):
        try:
            list_ids[path.name if path.name not in list_ids else str(path)] = read_id_list(path)
        except DatasetError as err:
            unreadable_lists.append((path, str(err)))
    if unreadable_lists:
        defects.append(Defect("list_unreadable", f"{len(unreadable_lists)} split list(s) missing or empty: "
                              + "; ".join(msg for _, msg in unreadable_lists),
                              [str(p) for p, _ in unreadable_lists]))
    if not list_ids and not unreadable_lists:
        defects.append(Defect("no_split_lists", f"no split list in '{root / 'ImageSets' / 'Segmentation'}' or "
                                                f"'{root}': add <split>.txt files (one id per line) or pass --list"))
    if list_ids:
        info.append("lists " + ", ".join(f"{name} ({len(ids)})" for name, ids in list_ids.items()))
    checked_ids = list(dict.fromkeys(i for ids in list_ids.values() for i in ids)) if list_ids else sorted(images)

    if image_dir.is_dir() and list_ids:
        per_list = {name: [i for i in ids if i not in images] for name, ids in list_ids.items()}
        missing = list(dict.fromkeys(i for ids in per_list.values() for i in ids))
        if missing:
            where = ", ".join(f"{name}: {len(ids)}" for name, ids in per_list.items() if ids)
            defects.append(Defect("ids_without_image", f"{len(missing)} ids of the split lists have no image in "
                                  f"'{image_dir}' ({where}; first: {_first(missing)}): add the images or remove "
                                  f"the ids from the lists", missing))

    # class names and image-level labels
    names_path = Path(labels_txt) if labels_txt else root / "labels.txt"
    try:
        class_names = load_class_names(names_path)
    except DatasetError as err:
        defects.append(Defect("class_names", str(err)))
        class_names = []
    num_classes = len(class_names)
    info.append(f"C={num_classes} classes from " + (f"'{names_path}'" if names_path.is_file() else "VOC defaults"))

    labels_path = Path(cls_labels) if cls_labels else root / "cls_labels.npy"
    labels: dict[str, np.ndarray] | None = None
    rebuild_hint = f"`python -m smaf.data.prepare --root {root} --rebuild-labels`"
    if not labels_path.is_file():
        defects.append(Defect("labels_missing", f"image-level labels '{labels_path}' not found: rebuild them from "
                                                f"the masks with {rebuild_hint}"))
    else:
        try:
            labels = load_cls_labels(labels_path)
        except DatasetError as err:
            defects.append(Defect("labels_unreadable", f"{err}; rebuild it with {rebuild_hint}"))
    if labels is not None:
        info.append(f"{len(labels)} image-level labels")
        no_label = [i for i in checked_ids if i not in labels]
        if no_label:
            defects.append(Defect("ids_without_labels", f"{len(no_label)} ids have no entry in '{labels_path}' "
                                  f"(first: {_first(no_label)}): rebuild the labels ({rebuild_hint}) or fix the "
                                  f"lists", no_label))
        if num_classes:
            wrong = sorted(i for i, v in labels.items() if v.shape[0] != num_classes)
            if wrong:
                lengths = sorted({labels[i].shape[0] for i in wrong})
                defects.append(Defect("label_length", f"{len(wrong)} label vectors in '{labels_path}' have length "
                                      f"{lengths} but '{names_path.name}' gives C={num_classes} (first: "
                                      f"{_first(wrong)}): fix labels.txt or rebuild the labels", wrong))

    # masks
    mask_dir = find_mask_dir(root)
    scan = mask_scan if mask_scan is not None else scan_masks(mask_dir, workers)
    if mask_dir is None:
        info.append("no masks (SegmentationClassAug/ or SegmentationClass/)")
    else:
        info.append(f"{len(scan.hist) + len(scan.unreadable)} masks in {mask_dir.name}/")
    if scan.unreadable:
        bad = sorted(scan.unreadable)
        defects.append(Defect("unreadable_masks", f"{len(bad)} masks cannot be read as class-index PNGs (first: "
                              f"{scan.unreadable[bad[0]]}); replace them", bad))
    if num_classes:
        allowed = np.zeros(256, bool)
        allowed[:num_classes + 1] = True
        allowed[255] = True
        bad_values = {i: np.flatnonzero((h > 0) & ~allowed) for i, h in scan.hist.items()}
        bad_values = {i: v for i, v in sorted(bad_values.items()) if v.size}
        if bad_values:
            values = sorted({int(x) for v in bad_values.values() for x in v})
            defects.append(Defect("mask_values", f"{len(bad_values)} masks in '{mask_dir}' hold values {values} "
                                  f"outside 0..{num_classes} and 255 (first: {_first(list(bad_values))}): check "
                                  f"labels.txt (C={num_classes}) or convert the masks to class indices",
                                  list(bad_values)))
    wrong_size = []
    for image_id, shape in sorted(scan.shape.items()):
        if image_id in images:
            size = _image_size(images[image_id])
            if size is not None and size != tuple(shape):
                wrong_size.append(f"{image_id} ({shape[0]}x{shape[1]} vs {size[0]}x{size[1]})")
    if wrong_size:
        defects.append(Defect("mask_size", f"{len(wrong_size)} masks differ in size from their image (mask vs "
                              f"image, HxW; first: {_first(wrong_size)}): regenerate the masks at image size",
                              [s.split()[0] for s in wrong_size]))
    if labels is not None and num_classes:
        extra, absent = [], []
        for image_id, hist in sorted(scan.hist.items()):
            vec = labels.get(image_id)
            if vec is None or vec.shape[0] != num_classes:
                continue
            present = mask_label_vector(hist, num_classes) > 0
            labelled = vec > 0.5
            for kind_list, which in ((extra, present & ~labelled), (absent, labelled & ~present)):
                if which.any():
                    kind_list.append((image_id, [class_names[c] for c in np.flatnonzero(which)]))
        fix = f"fix the label or the mask, or rebuild the labels from the masks ({rebuild_hint})"
        shown_extra = [f"{i} (+{' +'.join(c)})" for i, c in extra]
        shown_absent = [f"{i} (-{' -'.join(c)})" for i, c in absent]
        if extra:
            defects.append(Defect("mask_class_not_labelled", f"{len(extra)} masks contain classes missing from "
                                  f"their image-level label (first: {_first(shown_extra)}): {fix}",
                                  [i for i, _ in extra]))
        if absent:
            defects.append(Defect("labelled_not_in_mask", f"{len(absent)} image-level labels name classes absent "
                                  f"from the mask (first: {_first(shown_absent)}): {fix}", [i for i, _ in absent]))

    # image decoding (slow: optional above AUTO_DECODE_LIMIT)
    to_decode = [i for i in checked_ids if i in images]
    decode = check_images if check_images is not None else len(to_decode) <= AUTO_DECODE_LIMIT
    if decode and to_decode:
        def try_decode(image_id: str) -> str | None:
            try:
                load_image(images[image_id])
            except (ValueError, FileNotFoundError):
                return image_id
            return None

        broken = [i for i in _map_threads(try_decode, to_decode, workers) if i is not None]
        if broken:
            defects.append(Defect("unreadable_images", f"{len(broken)} images fail to decode (first: "
                                  f"{_first([images[i].name for i in broken])}): replace them or remove their ids "
                                  f"from the lists", broken))
        info.append(f"{len(to_decode)} images decoded")
    elif to_decode:
        info.append(f"image decoding skipped for {len(to_decode)} images (pass --check-images to force it)")

    # saliency
    sal_dir = Path(saliency_dir) if Path(saliency_dir).is_absolute() else root / saliency_dir
    if sal_dir.is_dir():
        no_sal = [i for i in checked_ids if not (sal_dir / f"{i}.png").is_file()]
        if no_sal:
            defects.append(Defect("saliency_missing", f"{len(no_sal)} ids have no saliency map in '{sal_dir}' "
                                  f"(first: {_first(no_sal)}): add <id>.png maps, or train with "
                                  f"train_cls.loss=cam (no saliency)", no_sal))
        info.append(f"saliency maps in {sal_dir.name}/")
    else:
        info.append("no saliency folder")
    report.counts = {"images": len(images), "lists": {k: len(v) for k, v in list_ids.items()},
                     "masks": len(scan.hist), "labels": None if labels is None else len(labels),
                     "num_classes": num_classes}
    return report


def check_layout(root: str | os.PathLike, lists: Iterable[str | os.PathLike] = (), **kwargs) -> list[Defect]:
    """The defects of :func:`inspect_layout` (empty list when the layout is consistent)."""
    return inspect_layout(root, lists, **kwargs).defects


# ---------------------------------------------------------------------------------------- rebuilding
@dataclass
class RebuildResult:
    """What :func:`rebuild_labels` changed: ids added, changed (with ``+class``/``-class`` notes), unchanged,
    and kept (existing entries without a mask); ``path`` written."""

    path: Path
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    kept: int = 0
    masks_with_bad_values: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"rebuilt image-level labels from {len(self.added) + len(self.changed) + self.unchanged} masks -> "
               f"'{self.path}': {len(self.added)} added, {len(self.changed)} changed, {self.unchanged} unchanged, "
               f"{self.kept} kept (no mask)"]
        if self.added:
            out.append(f"  added: {_first(self.added, 10)}")
        if self.changed:
            out.append(f"  changed: {_first(self.changed, 10)}")
        if self.masks_with_bad_values:
            out.append(f"  warning: {len(self.masks_with_bad_values)} masks hold values outside the classes; those "
                       f"pixels were ignored (first: {_first(self.masks_with_bad_values)})")
        return out


def rebuild_labels(root: str | os.PathLike, out: str | os.PathLike | None = None,
                   cls_labels: str | os.PathLike | None = None, labels_txt: str | os.PathLike | None = None,
                   workers: int | None = None, mask_scan: MaskScan | None = None) -> RebuildResult:
    """Rebuild image-level labels from the masks: class c is present when any pixel == c+1.

    Args:
        root: dataset root with ``SegmentationClassAug/`` or ``SegmentationClass/``.
        out: file to write (default ``<root>/cls_labels.npy``), atomically.
        cls_labels: existing labels to start from (default ``<root>/cls_labels.npy``, when it exists and is
            readable); their entries for ids without a mask are kept unchanged.
        labels_txt: class names (default ``<root>/labels.txt``, VOC's 20 when absent) giving C.
        workers: mask-reading threads. mask_scan: a :func:`scan_masks` result to reuse.

    Returns:
        A :class:`RebuildResult`.

    Raises:
        DatasetError: the root has no mask folder, or its masks are all unreadable.
    """
    root = Path(root)
    out_path = Path(out) if out else root / "cls_labels.npy"
    class_names = load_class_names(Path(labels_txt) if labels_txt else root / "labels.txt")
    num_classes = len(class_names)
    mask_dir = find_mask_dir(root)
    if mask_dir is None:
        raise DatasetError(f"'{root}' has no SegmentationClassAug/ or SegmentationClass/ folder: labels can only be "
                           f"rebuilt from masks")
    scan = mask_scan if mask_scan is not None else scan_masks(mask_dir, workers)
    if not scan.hist:
        raise DatasetError(f"no readable mask in '{mask_dir}': nothing to rebuild the labels from")
    source = Path(cls_labels) if cls_labels else root / "cls_labels.npy"
    old: dict[str, np.ndarray] = {}
    if source.is_file():
        try:
            old = load_cls_labels(source)
        except DatasetError:
            old = {}  # unreadable: replaced entirely by the rebuilt labels
    result = RebuildResult(out_path)
    new: dict[str, np.ndarray] = {}
    allowed = np.zeros(256, bool)
    allowed[:num_classes + 1] = True
    allowed[255] = True
    for image_id, hist in sorted(scan.hist.items()):
        vec = mask_label_vector(hist, num_classes)
        new[image_id] = vec
        if (hist[~allowed] > 0).any():
            result.masks_with_bad_values.append(image_id)
        before = old.get(image_id)
        if before is None:
            result.added.append(image_id)
        elif before.shape != vec.shape:
            result.changed.append(f"{image_id} (length {before.shape[0]} -> {num_classes})")
        elif not np.array_equal(before > 0.5, vec > 0.5):
            gained = [class_names[c] for c in np.flatnonzero((vec > 0.5) & ~(before > 0.5))]
            lost = [class_names[c] for c in np.flatnonzero(~(vec > 0.5) & (before > 0.5))]
            result.changed.append(f"{image_id} ({' '.join(['+' + n for n in gained] + ['-' + n for n in lost])})")
        else:
            result.unchanged += 1
    for image_id, vec in old.items():
        if image_id not in new:
            new[image_id] = vec
            result.kept += 1

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, new, allow_pickle=True)

    atomic_save(out_path, write)
    return result


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """CLI: print defects (one line per kind) and exit 1, or ``layout OK: ...`` and exit 0."""
    p = argparse.ArgumentParser(prog="python -m smaf.data.prepare",
                                description="Check a VOC-layout dataset root; optionally rebuild cls_labels.npy.")
    p.add_argument("--root", required=True, help="dataset root (holds JPEGImages/)")
    p.add_argument("--list", action="append", default=[], help="extra split list to check (repeatable)")
    p.add_argument("--cls-labels", help="image-level labels file (default <root>/cls_labels.npy)")
    p.add_argument("--labels-txt", help="class names file (default <root>/labels.txt, else VOC's 20)")
    p.add_argument("--saliency-dir", default="SALImages", help="saliency folder (default SALImages)")
    p.add_argument("--check-images", action=argparse.BooleanOptionalAction, default=None,
                   help=f"decode every image (default: only when at most {AUTO_DECODE_LIMIT} images)")
    p.add_argument("--rebuild-labels", action="store_true",
                   help="rebuild cls_labels.npy from the masks (class c present if any pixel == c+1)")
    p.add_argument("--labels-out", help="where --rebuild-labels writes (default <root>/cls_labels.npy)")
    p.add_argument("--workers", type=int, default=None, help="file-reading threads (default: all cores)")
    args = p.parse_args(argv)

    root = Path(args.root)
    scan = None
    cls_labels = args.cls_labels
    if args.rebuild_labels:
        if not root.is_dir():
            print(f"error: dataset root '{root}' does not exist: fix --root", file=sys.stderr)
            return EXIT_EXPECTED_ERROR
        scan = scan_masks(find_mask_dir(root), args.workers)
        try:
            rebuilt = rebuild_labels(root, args.labels_out, cls_labels=args.cls_labels, labels_txt=args.labels_txt,
                                     workers=args.workers, mask_scan=scan)
        except DatasetError as err:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_EXPECTED_ERROR
        print("\n".join(rebuilt.lines()))
        cls_labels = rebuilt.path  # check the labels just written
    report = inspect_layout(root, args.list, cls_labels=cls_labels, labels_txt=args.labels_txt,
                            saliency_dir=args.saliency_dir, check_images=args.check_images, workers=args.workers,
                            mask_scan=scan)
    for defect in report.defects:
        print(f"defect {defect}")
    if not report.ok:
        print("found: " + "; ".join(report.info))
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
