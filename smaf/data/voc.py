"""VOC-layout datasets: any root with ``JPEGImages/``, ``SegmentationClassAug/`` or ``SegmentationClass/``,
optional ``SALImages/``, ``cls_labels.npy`` and split lists.

Split lists hold bare ids (``2007_000032``) or the PSA two-column form
(``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``). ``cls_labels.npy`` is a pickled
dict ``{id: float32[C]}`` without a background entry. Class names come from ``labels.txt`` (one per line,
an optional leading ``background`` is dropped) or default to the 20 VOC classes.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import load_image, load_label_png
from ..runtime import SmafError
from .transforms import JointTrainTransform, normalize, resize_image

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
DATASET_HELP = "see dataset/README.md for the expected layout, or run `bash script/demo.sh` for the synthetic demo"


class DatasetError(SmafError, ValueError):
    """A dataset file or folder is missing or inconsistent; the message names it and the fix."""


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Image ids of a split list (bare ids or the two-column ``/JPEGImages/x.jpg /Seg.../x.png`` form)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split list '{path}' not found: set data.*_list in the config; {DATASET_HELP}")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        ids.append(Path(first).stem if ("/" in first or "." in first) else first)
    if not ids:
        raise DatasetError(f"split list '{path}' is empty")
    return ids


def load_cls_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{id: float32[C]}`` from a pickled ``cls_labels.npy`` dict, read without running code
    (:func:`smaf.safe_load.load_npy`: only dicts, arrays, dtypes and numbers are unpickled)."""
    from ..safe_load import SafeLoadError, load_npy_object

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image-level labels '{path}' not found: set data.cls_labels, or rebuild them from masks "
                           f"with `python -m smaf.data.prepare --root <root> --rebuild-labels`")
    try:
        obj = load_npy_object(path, "image-level labels")
    except SafeLoadError as err:  # unreadable, or refused (it would need code to be unpickled)
        raise DatasetError(f"{err}; expected a pickled dict {{id: float32[C]}}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"'{path}' holds a {type(obj).__name__}, not a pickled dict {{id: float32[C]}}")
    out = {}
    for k, v in obj.items():
        try:
            out[str(k)] = np.asarray(v, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise DatasetError(f"'{path}': the entry {str(k)!r} is a {type(v).__name__}, expected a float32[C] "
                               f"label vector") from None
    return out


def load_class_names(path: str | os.PathLike | None) -> list[str]:
    """Foreground class names from a ``labels.txt`` (leading ``background`` dropped); VOC's 20 if None/absent."""
    if path is None or not Path(path).is_file():
        return list(VOC_CLASSES)
    names = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if names and names[0].lower() in ("background", "_background_", "bg"):
        names = names[1:]
    if not names:
        raise DatasetError(f"class names file '{path}' lists no foreground class")
    return names


class VOCLayout:
    """Paths and metadata of one VOC-layout dataset root.

    Args:
        root: dataset folder holding ``JPEGImages/``.
        cls_labels: path of ``cls_labels.npy``; '' means ``<root>/cls_labels.npy``.
        labels_txt: class names file; '' means ``<root>/labels.txt`` (VOC's 20 classes if absent).
        saliency_dir: saliency folder: a bare name is a folder of ``root`` (``SALImages``); a path with a
            separator is used as it is (relative to the working directory, like ``root``).
    """

    def __init__(self, root: str | os.PathLike, cls_labels: str = "", labels_txt: str = "",
                 saliency_dir: str = "SALImages"):
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            what = "not found" if not self.root.exists() else "has no JPEGImages/ folder"
            raise DatasetError(f"dataset root '{self.root}' {what}: set data.root; {DATASET_HELP}")
        self.image_dir = self.root / "JPEGImages"
        self.mask_dir = next((self.root / d for d in ("SegmentationClassAug", "SegmentationClass")
                              if (self.root / d).is_dir()), None)
        sal = Path(saliency_dir)
        # a bare folder name lives in the root (SALImages/); a path is taken as it is, so saliency maps made for a
        # read-only dataset can live elsewhere (e.g. dataset/saliency/pets/SALImages)
        self.saliency_dir = sal if sal.is_absolute() or len(sal.parts) > 1 else self.root / sal
        self.labels_path = Path(cls_labels) if cls_labels else self.root / "cls_labels.npy"
        names_path = Path(labels_txt) if labels_txt else self.root / "labels.txt"
        self.names_path = names_path
        self.class_names = load_class_names(names_path)
        self._labels: dict[str, np.ndarray] | None = None

    @classmethod
    def from_config(cls, cfg) -> "VOCLayout":
        """Layout from the ``data`` section of a config."""
        d = cfg.data
        return cls(d.root, d.cls_labels, d.labels_txt, d.saliency_dir)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes C."""
        return len(self.class_names)

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """``{id: float32[C]}``, loaded on first use and checked against the class names."""
        if self._labels is None:
            labels = load_cls_labels(self.labels_path)
            sizes = {v.shape[0] for v in labels.values()}
            if sizes != {self.num_classes}:
                raise DatasetError(
                    f"label list mismatch: '{self.labels_path}' has vectors of length {sorted(sizes)} but the class "
                    f"names give C={self.num_classes}; fix data.labels_txt or rebuild the labels with "
                    f"`python -m smaf.data.prepare --root {self.root} --rebuild-labels`")
            self._labels = labels
        return self._labels

    def image_path(self, image_id: str) -> Path:
        """Path of the image file of ``image_id`` (``.jpg`` first, then other suffixes)."""
        first = self.image_dir / f"{image_id}.jpg"
        if first.exists():
            return first
        for suffix in IMAGE_SUFFIXES[1:]:
            p = self.image_dir / f"{image_id}{suffix}"
            if p.exists():
                return p
        return first

    def mask_path(self, image_id: str) -> Path | None:
        """Path of the ground-truth mask, or None when the dataset has no mask folder."""
        return None if self.mask_dir is None else self.mask_dir / f"{image_id}.png"

    def saliency_path(self, image_id: str) -> Path:
        return self.saliency_dir / f"{image_id}.png"

    def has_masks(self, ids: list[str]) -> bool:
        """True when every id of ``ids`` has a ground-truth mask file."""
        return self.mask_dir is not None and all(self.mask_path(i).is_file() for i in ids)

    def read_list(self, path: str | os.PathLike) -> list[str]:
        """Ids of a split list, checked to have image-level labels."""
        ids = read_id_list(path)
        missing = [i for i in ids if i not in self.labels]
        if missing:
            raise DatasetError(f"{len(missing)} ids of '{path}' have no entry in '{self.labels_path}' "
                               f"(first: {missing[0]}); rebuild the labels or fix the list")
        return ids

    def load_image(self, image_id: str) -> np.ndarray:
        return load_image(self.image_path(image_id))

    def load_mask(self, image_id: str) -> np.ndarray:
        path = self.mask_path(image_id)
        if path is None or not path.is_file():
            raise DatasetError(f"mask '{path}' not found; evaluation needs SegmentationClass(Aug)/<id>.png")
        return load_label_png(path)

    def load_saliency(self, image_id: str) -> np.ndarray:
        """Saliency map as float32 (H, W) in [0, 1] (colour files are averaged over channels, as EPS does)."""
        path = self.saliency_path(image_id)
        if not path.is_file():
            raise DatasetError(f"saliency map '{path}' not found: the eps loss needs SALImages/<id>.png; "
                               f"use train_cls.method=cam for datasets without saliency, or make maps with `bash script/saliency.sh`")
        return load_image(path).astype(np.float32).mean(2) / 255.0


PREPARE_HINT = "`python -m smaf.data.prepare --root {root}` lists every such problem"


def _header_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image or PNG from its header (no decoding); None when it cannot be opened."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (OSError, SyntaxError, ValueError):
        return None


def _first_ids(ids: list, n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def check_inputs(layout: "VOCLayout", ids: list[str], list_key: str, saliency: bool = False,
                 mask_ids: list[str] | None = None, mask_values: bool = False, workers: int | None = None) -> None:
    """Check a stage's inputs before it writes anything; the first problem is a :class:`DatasetError` (one
    line: how many ids, the first ones, the key to fix).

    Args:
        ids: the ids the stage reads; each needs an image whose header can be read (a truncated body is only
            found when decoded: the loader's error names the file), and with ``saliency`` a saliency map.
        list_key: the config key of the list (``data.train_list`` ...), for the message.
        mask_ids: ids scored against masks (validation, evaluation): each existing mask must have its image's
            size (a mask of another image would otherwise be cropped or fail as a "small prediction").
        mask_values: also decode those masks and check their values are 0..C or 255 (C from the class names).
    """
    from concurrent.futures import ThreadPoolExecutor

    hint = PREPARE_HINT.format(root=layout.root)
    threads = max(1, min(16, int(workers or os.cpu_count() or 1)))

    def image_problem(image_id: str):
        path = layout.image_path(image_id)
        if not path.is_file():
            return "missing"
        return None if _header_size(path) is not None else "unreadable"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(image_problem, ids))
    for kind in ("missing", "unreadable"):
        bad = [i for i, p in zip(ids, problems) if p == kind]
        if not bad:
            continue
        if kind == "missing":
            raise DatasetError(f"{len(bad)} ids of {list_key} have no image in '{layout.image_dir}' (first: "
                               f"{_first_ids(bad)}): add the images or remove the ids from the list; {hint}")
        raise DatasetError(f"{len(bad)} images of {list_key} cannot be read (first: "
                           f"{layout.image_path(bad[0])}): replace them or remove their ids from the list; {hint}")
    if saliency:
        no_sal = [i for i in ids if not layout.saliency_path(i).is_file()]
        if no_sal:
            raise DatasetError(f"{len(no_sal)} ids of {list_key} have no saliency map in '{layout.saliency_dir}' "
                               f"(first: {_first_ids(no_sal)}): the eps loss needs SALImages/<id>.png; use "
                               f"train_cls.method=cam for datasets without saliency, or make maps with "
                               f"`bash script/saliency.sh`")
    if not mask_ids or layout.mask_dir is None:
        return
    with_mask = [i for i in mask_ids if layout.mask_path(i).is_file()]

    def mask_problem(image_id: str):
        mask_path, image_path = layout.mask_path(image_id), layout.image_path(image_id)
        size, image_size = _header_size(mask_path), _header_size(image_path)
        if size is None:
            return f"mask '{mask_path}' cannot be read: replace it"
        if image_size is not None and size != image_size:
            return (f"mask '{mask_path}' is {size[0]}x{size[1]} (HxW) but its image '{image_path}' is "
                    f"{image_size[0]}x{image_size[1]}: a mask must have its image's size; fix the mask or the image")
        if mask_values:
            try:
                mask = load_label_png(mask_path)
            except ValueError as err:
                return str(err)
            bad = mask[(mask > layout.num_classes) & (mask != 255)]
            if bad.size:
                return mask_value_message(layout, mask_path, int(bad.max()))
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = [(i, m) for i, m in zip(with_mask, pool.map(mask_problem, with_mask)) if m]
    if found:
        more = f" ({len(found)} masks of {len(with_mask)} have such problems; {hint})" if len(found) > 1 else ""
        raise DatasetError(found[0][1] + more)


def mask_value_message(layout: "VOCLayout", mask_path, value: int) -> str:
    """The one-line error for a mask value outside 0..C and 255 (the class names say C)."""
    names = layout.names_path if layout.names_path.is_file() else "the 20 VOC defaults (no labels.txt)"
    return (f"class count mismatch: mask '{mask_path}' holds class value {value} but the class names ({names}) "
            f"give only {layout.num_classes} foreground classes (values 0..{layout.num_classes} and 255): set "
            f"data.labels_txt to the dataset's labels.txt, or convert the masks to class indices")


def _key(key) -> tuple[int, int | None]:
    """Dataset keys are an index, or (index, augmentation seed) from :class:`~smaf.data.sampler`."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


class ClassificationDataset(Dataset):
    """Training samples for stages 0 and 2.

    Each item is a dict:
        ``id`` str; ``image`` float32 (3, crop, crop) normalised; ``valid`` float32 (crop, crop), 1 on image
        pixels, 0 on padding; ``labels`` float32 (C,); ``params`` the transform parameters (see
        :class:`JointTrainTransform`); with ``saliency=True``: ``saliency`` float32 (1, crop, crop) in [0, 1];
        with ``soft_dir``: ``soft`` float32 (C, crop, crop), the image's fused map (CAM dict in
        ``<soft_dir>/<id>.npy``) under the same geometry, and with ``soft_bg_rule`` (a
        :class:`~smaf.cam.background.BackgroundRule`): ``soft_bg`` float32 scalar, the rule's background score of the
        whole fused map; with ``full_size``: ``full`` float32 (3, S, S), the whole image resized to S x S.

    Keys are an index or ``(index, seed)``; the seed makes the augmentation of an item reproducible
    regardless of worker count or resume point.
    """

    def __init__(self, layout: VOCLayout, ids: list[str], transform: JointTrainTransform,
                 saliency: bool = False, soft_dir: str | os.PathLike | None = None, full_size: int = 0,
                 soft_bg_rule=None):
        self.layout, self.ids, self.transform = layout, list(ids), transform
        self.saliency, self.full_size, self.soft_bg_rule = saliency, full_size, soft_bg_rule
        self.soft_dir = Path(soft_dir) if soft_dir else None
        if self.soft_dir is not None:
            missing = [i for i in self.ids if not (self.soft_dir / f"{i}.npy").is_file()]
            if missing:
                raise DatasetError(f"{len(missing)} fused maps missing in '{self.soft_dir}' (first: {missing[0]}.npy): "
                                   f"run stage 1 (bash script/gen_fusion.sh) on this list first")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> dict:
        from ..io import cam_dict_to_array, load_cam_dict

        index, seed = _key(key)
        image_id = self.ids[index]
        rng = np.random.default_rng(seed if seed is not None else None)
        image = self.layout.load_image(image_id)
        sal = self.layout.load_saliency(image_id) if self.saliency else None
        soft = None
        if self.soft_dir is not None:
            cams = load_cam_dict(self.soft_dir / f"{image_id}.npy")
            # checked before densifying: cam_dict_to_array would fail with a bare numpy broadcast/index error
            shapes = {tuple(v.shape) for v in cams.values()}
            if shapes - {tuple(image.shape[:2])} or any(not 0 <= k < self.layout.num_classes for k in cams):
                raise DatasetError(f"fused map '{self.soft_dir / image_id}.npy' has maps {sorted(shapes)} for classes "
                                   f"{sorted(cams)} but the image is {image.shape[:2]} with "
                                   f"{self.layout.num_classes} classes; regenerate it with stage 1")
            soft = cam_dict_to_array(cams, self.layout.num_classes, image.shape[:2])
            soft_bg = self.soft_bg_rule.score_cam_dict(cams) if self.soft_bg_rule is not None else None
        out = self.transform(rng, image, saliency=sal, soft=soft)
        sample = {"id": image_id, "image": torch.from_numpy(out["image"]), "valid": torch.from_numpy(out["valid"]),
                  "labels": torch.from_numpy(self.layout.labels[image_id].copy()), "params": out["params"]}
        if sal is not None:
            sample["saliency"] = torch.from_numpy(out["saliency"][None])
        if soft is not None:
            sample["soft"] = torch.from_numpy(out["soft"])
            if soft_bg is not None:
                sample["soft_bg"] = torch.tensor(soft_bg, dtype=torch.float32)
        if self.full_size:
            full = resize_image(image, (self.full_size, self.full_size))
            sample["full"] = torch.from_numpy(normalize(full))
        return sample


class InferenceDataset(Dataset):
    """Whole images for CAM inference (stages 1 and 3, validation).

    Each item is a dict: ``id``; ``image`` uint8 (H, W, 3) the original RGB image; ``labels`` float32 (C,);
    ``scaled`` a list with, per scale s, the normalised float32 tensor (3, round(h s), round(w s)) resized
    bicubically (``resize``: ``pil`` or ``cv2``, see :func:`~smaf.data.transforms.resize_image`), where
    (h, w) = (H, W), or, with ``base_long`` > 0, the size whose long side is ``base_long`` (maps are still
    produced at (H, W) by the caller).
    """

    def __init__(self, layout: VOCLayout, ids: list[str], scales=(1.0,), base_long: int = 0, resize: str = "cv2"):
        self.layout, self.ids, self.scales = layout, list(ids), tuple(float(s) for s in scales)
        self.base_long, self.resize = int(base_long), resize

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.layout.load_image(image_id)
        h, w = image.shape[:2]
        if self.base_long:
            ratio = self.base_long / max(h, w)
            h, w = max(1, round(h * ratio)), max(1, round(w * ratio))
        scaled = []
        for s in self.scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            scaled.append(torch.from_numpy(normalize(resize_image(image, size, self.resize))))
        return {"id": image_id, "image": image, "labels": torch.from_numpy(self.layout.labels[image_id].copy()),
                "scaled": scaled}


class SegmentationDataset(Dataset):
    """Ground-truth masks for evaluation: items are ``(id, uint8 (H, W) mask)``."""

    def __init__(self, layout: VOCLayout, ids: list[str]):
        self.layout, self.ids = layout, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        return image_id, self.layout.load_mask(image_id)


def collate_single(batch: list):
    """Collate for batch size 1 loaders that yield one whole image at a time."""
    assert len(batch) == 1
    return batch[0]


def collate_train(batch: list[dict]) -> dict:
    """Stack training samples; ``id`` and ``params`` stay lists."""
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
