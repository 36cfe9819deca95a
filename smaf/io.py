"""File formats shared by every stage.

* CAM ``.npy`` dict (PSA/EPS/SMAF format): a pickled ``{class index 0..C-1: HxW float32}`` holding the
  image's labelled classes only, at the original image resolution.
* Label PNG: palette PNG with the VOC colour map, values 0 (background), c+1 (class c), 255 (ignore).
* Overlays: an image blended with a coloured mask or a heat map, for a person to look at.

Writes are atomic (temp name + rename), so an interrupted stage never leaves a half-written file.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette: uint8 array (n, 3); index 255 is (224, 224, 192)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


VOC_COLORMAP = voc_colormap()


_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
#: Names of the temporary files of :func:`atomic_save` (``.<name>.<8 random characters>.tmp``, the pattern of
#: ``tempfile.mkstemp`` that earlier versions used, so their leftovers are recognised too).
TEMP_FILE_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _atomic_target(path: Path) -> str:
    """Create an empty temp file beside ``path`` and return its name. Created with mode 0666 minus the umask
    (``tempfile.mkstemp`` would make it 0600, and the rename would keep that: results others cannot read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random()
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{''.join(rng.choices(_TEMP_CHARS, k=8))}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 37**8 names
            continue
        os.close(fd)
        return str(tmp)
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files an interrupted :func:`atomic_save` left under ``folder`` (recursively); returns
    them. Call it only when no other process writes into ``folder`` (a stage does it when it starts)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp") and TEMP_FILE_RE.match(name):
                p = Path(root) / name
                try:
                    p.unlink()
                except FileNotFoundError:  # pragma: no cover - removed meanwhile
                    continue
                removed.append(p)
    return removed


def atomic_save(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file to ``path``; returns ``path``."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ----------------------------------------------------------------------------------------- CAM dicts
def save_cam_dict(path: str | os.PathLike, cams: dict) -> Path:
    """Save ``{class index: HxW float32}`` as a pickled ``.npy`` dict (atomic)."""
    clean = {int(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in cams.items()}

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, clean, allow_pickle=True)

    return atomic_save(path, write)


def load_cam_dict(path: str | os.PathLike) -> dict:
    """Load a CAM ``.npy`` dict -> ``{class index: HxW float32}``. Also accepts a saved CxHxW array
    (keys become 0..C-1). Read without running code (:func:`smaf.safe_load.load_npy`: only dicts, arrays,
    dtypes and numbers are unpickled); a file that is not such a dict fails with one line naming it."""
    from .safe_load import SafeLoadError, UnsafeFileError, load_npy

    fix = "delete it and re-run the stage that wrote it"
    try:
        obj = load_npy(path, "CAM .npy file")
    except UnsafeFileError:
        raise
    except SafeLoadError as err:
        raise ValueError(f"{err}; {fix}") from None
    except OSError as err:
        raise ValueError(f"{path}: not a readable CAM .npy file ({one_line_reason(err)}); {fix}") from None
    if obj.dtype == object and obj.shape == ():
        obj = obj.item()
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a pickled dict {{class: HxW array}}, got {type(obj).__name__}; "
                             f"{fix}")
        out = {}
        for k, v in obj.items():
            try:
                key = int(k)
                arr = np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: expected a dict {{class index: HxW float32}}, got the entry {k!r}: "
                                 f"{type(v).__name__}; {fix}") from None
            if arr.ndim < 1:
                raise ValueError(f"{path}: class {k!r} holds a scalar, expected an HxW map; {fix}")
            out[key] = arr
        return out
    if obj.ndim == 3 and obj.dtype != object:
        return {i: obj[i].astype(np.float32) for i in range(obj.shape[0])}
    raise ValueError(f"{path}: expected a CAM dict or a CxHxW array, got shape {obj.shape}; {fix}")


def one_line_reason(err: BaseException) -> str:
    """An exception as one short line (for messages that embed it)."""
    text = " ".join(str(err).split())
    return text[:200] if text else err.__class__.__name__


def cam_dict_to_array(cams: dict, num_classes: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Dense (C, H, W) float32 array from a CAM dict; absent classes are zero."""
    if size is None:
        if not cams:
            raise ValueError("an empty CAM dict needs an explicit size")
        size = next(iter(cams.values())).shape
    out = np.zeros((num_classes, *size), dtype=np.float32)
    for k, v in cams.items():
        out[int(k)] = v
    return out


def cams_to_label(cams: np.ndarray, bg_threshold: float) -> np.ndarray:
    """VOC label map from dense fg maps (C, H, W): argmax over [bg_threshold; maps] -> uint8 (H, W),
    0 = background, c+1 = class c."""
    bg = np.full((1, *cams.shape[1:]), bg_threshold, dtype=np.float32)
    return np.argmax(np.concatenate([bg, cams.astype(np.float32, copy=False)], 0), 0).astype(np.uint8)


def cam_dict_to_label(cams: dict, bg_threshold: float, size: tuple[int, int] | None = None) -> np.ndarray:
    """Label map (H, W) uint8 from a CAM dict with a constant background score (VOC numbering)."""
    if not cams:
        if size is None:
            raise ValueError("an empty CAM dict needs an explicit size")
        return np.zeros(size, dtype=np.uint8)
    keys = sorted(cams)
    stack = np.stack([cams[k] for k in keys]).astype(np.float32)
    idx = cams_to_label(stack, bg_threshold)
    lut = np.array([0] + [k + 1 for k in keys], dtype=np.uint8)
    return lut[idx]


# ------------------------------------------------------------------------------------------ PNGs
def save_label_png(path: str | os.PathLike, label: np.ndarray) -> Path:
    """Write a uint8 (H, W) label map as a palette PNG with the VOC colour map (atomic)."""
    img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    img.putpalette(VOC_COLORMAP.flatten().tolist())
    return atomic_save(path, lambda tmp: img.save(tmp, format="PNG"))


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG (palette or greyscale) as uint8 (H, W) class indices (palette indices, not colours)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("P", "L", "I", "I;16"):
                return np.array(img).astype(np.uint8)
            if img.mode in ("RGB", "RGBA"):
                raise ValueError(f"{path}: label PNG is {img.mode}, expected a palette or greyscale PNG of class "
                                 f"indices; convert colour masks to indices first")
            return np.array(img.convert("L"))
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: unreadable PNG ({err}); replace or delete the file") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3), whatever its mode (palette, RGBA, greyscale, CMYK)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image not found; check data.root and the split list") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: corrupt or unreadable image ({err}); replace it or remove its id from the list") \
            from None


def image_area(path: str | os.PathLike) -> int:
    """Pixels of the image at ``path`` from its header alone (no decoding); 0 when it cannot be read (the
    caller's decoder then reports the problem)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return width * height
    except (OSError, ValueError):
        return 0


def save_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB uint8 image (PNG or JPEG by suffix), atomically."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    return atomic_save(path, lambda tmp: img.save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {})))


# -------------------------------------------------------------------------------------- overlays
def colorize_label(label: np.ndarray) -> np.ndarray:
    """(H, W) label -> (H, W, 3) uint8 VOC colours."""
    return VOC_COLORMAP[np.asarray(label, dtype=np.uint8)]


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB jet colours."""
    import cv2

    v = np.clip(np.nan_to_num(values), 0.0, 1.0)
    bgr = cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return bgr[..., ::-1]


def overlay(image: np.ndarray, label: np.ndarray | None = None, heat: np.ndarray | None = None,
            alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB image (H, W, 3) with a label map (VOC colours; background and 255 left clear) or a
    heat map in [0, 1]. Returns uint8 (H, W, 3)."""
    base = np.asarray(image, dtype=np.float32)
    if label is not None:
        colour = colorize_label(label).astype(np.float32)
        mask = ((label > 0) & (label < 255))[..., None]
        out = np.where(mask, (1 - alpha) * base + alpha * colour, base)
    elif heat is not None:
        out = (1 - alpha) * base + alpha * heatmap(heat).astype(np.float32)
    else:
        out = base
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay(path: str | os.PathLike, image: np.ndarray, label: np.ndarray | None = None,
                 heat: np.ndarray | None = None, alpha: float = 0.5) -> Path:
    """Write :func:`overlay` of the inputs to ``path``."""
    return save_image(path, overlay(image, label=label, heat=heat, alpha=alpha))


def make_panel(tiles: list[np.ndarray], titles: list[str] | None = None, height: int = 160) -> np.ndarray:
    """A horizontal strip of RGB tiles resized to one ``height``, with optional captions: uint8 (height, W, 3)."""
    import cv2

    row = []
    for i, tile in enumerate(tiles):
        h, w = tile.shape[:2]
        t = cv2.resize(np.ascontiguousarray(tile), (max(1, round(w * height / h)), height),
                       interpolation=cv2.INTER_NEAREST)
        if titles:
            t = np.ascontiguousarray(t)
            cv2.rectangle(t, (0, 0), (t.shape[1], 16), (0, 0, 0), -1)
            cv2.putText(t, titles[i], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        row.append(t)
        row.append(np.full((height, 4, 3), 255, np.uint8))
    return np.concatenate(row[:-1], 1)


def save_panel(path: str | os.PathLike, tiles: list[np.ndarray], titles: list[str] | None = None,
               height: int = 160) -> Path:
    """Write :func:`make_panel` of the tiles to ``path``."""
    return save_image(path, make_panel(tiles, titles, height))


# -------------------------------------------------------------------------------- background writer
class AsyncWriter:
    """Runs file writes on background threads so the device never waits on the disk.

    ``submit(fn, *args)`` queues a call; the queue is bounded (``max_pending``), so memory stays bounded
    when the disk is slower than inference. ``close()`` (or leaving the ``with`` block) waits for every
    write and re-raises the first error.
    """

    def __init__(self, threads: int = 2, max_pending: int = 32):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=max_pending)
        self._errors: list = []
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def _work(self):
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            fn, args = job
            try:
                fn(*args)
            except BaseException as err:  # noqa: BLE001 - surfaced in close()
                self._errors.append(err)
            finally:
                self._queue.task_done()

    def submit(self, fn, *args) -> None:
        if self._errors:
            raise self._errors[0]
        self._queue.put((fn, args))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        if self._errors:
            raise self._errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
