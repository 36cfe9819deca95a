"""Throughput benchmark of the pipeline's hot paths (``bash script/bench.sh`` = ``python -m smaf.bench``).

One run measures, on the same model and the same images:

a. fused-map generation (stages 1 and 3): OUR path, :func:`smaf.stages.gen_fusion.generate_fused_outputs`
   (an inference copy with conv+BN pairs folded and, on a CPU, the 1x1 convs fused with their activation
   (:mod:`smaf.models.fold`), DataLoader workers decode and resize, :func:`smaf.cam.fuse_image` runs
   original + flip as one batch on a GPU (two batch-1 passes on a CPU, faster there) and post-processes on
   the device, a background writer saves the files; on a CPU with a loader worker per core the workers also
   fuse, one thread each), against a per-image BASELINE written
   here after the reference's loop: batch 1, one forward per scale and flip (8 for 4 scales), each output
   copied to the CPU, softmax / bilinear upsampling (cv2, per class) / un-flip / sum / normalisation / argmax
   in NumPy, images decoded and resized in the main process, files written synchronously. Both write the
   same files (CAM ``.npy`` dicts + label PNGs) to temporary folders; the fused maps of the two paths are
   compared (max abs difference, fp32, must be <= 1e-4).
b. dense CRF (:func:`smaf.stages.crf.refine_folder`) with 1 worker against a pool of one worker per core,
   on the same masks (the PNGs of section a when it ran at ``--crf-size``, else the ground-truth masks), on
   images of VOC size (long side 500) by default.
c. evaluation (:func:`smaf.bench_eval.bench_evaluation`) on the 1449 real VOC val masks when
   ``../shared/data/voc12/SegmentationClassAug_val`` exists, else on the benchmark images' masks.
d. training steps: stage 0 (:func:`smaf.stages.train_cls.make_step`, EPS loss) and stage 2
   (:func:`smaf.stages.train_fusion.make_step`: teacher on the whole image + target + student
   forward/backward, then the EMA / prototype update), each with the poly SGD step; peak memory (CUDA:
   ``max_memory_allocated`` with AMP off, fp16 and bf16; CPU: peak RSS, AMP off and bf16 where the CPU has
   native bf16 kernels).

Section a also times our path under bf16 autocast (fp16 on CUDA without bf16) where the device has fast
kernels, against the fp32 baseline with the AMP tolerance 2e-2 (``--no-amp`` skips it).

Times are medians over ``--repeats`` runs after an excluded warm-up; the paths of a comparison rotate their
order from run to run so that a change of machine load hits each. Output: a table on
stdout and a JSON file (``--out``).

Data: the real Oxford-IIIT Pet subset (``../shared/data/pets``; ``PETS_ROOT`` overrides; ids of its
``val.txt``), else the synthetic demo set generated into ``work_dirs/bench/synthetic``; ``--data ROOT``
uses any VOC-layout root. The images are resized once (long side ``--size`` / ``--r38-size``) into
``work_dirs/bench/data/`` with their masks, a saliency map made from the mask (stage 0's EPS loss needs one;
its content does not change the cost) and soft maps (stage 2's fused maps, also from the mask).

Models: CPU: EfficientNet-Lite0 (output stride 8, ImageNet weights) and ResNet-38 at a small size with
random initialisation (no ResNet-38 weights exist offline; random weights cost the same). CUDA: ResNet-38
and EfficientNet-Lite0 at VOC sizes (long side 500). Models are in eval mode and identical for both paths.

Example::

    python -m smaf.bench --sections a,b --backbones efficientnet_lite0 --images 8 --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from .stages.common import available_cores

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("a", "b", "c", "d")
BACKBONES = ("efficientnet_lite0", "resnet38d")
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


# ------------------------------------------------------------------------------------------------ helpers
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


# ---------------------------------------------------------------------------------------------- the data
def _pick_ids(ids: list, n: int) -> list:
    """``n`` ids spread evenly over the list (split lists are often sorted by class)."""
    if n >= len(ids):
        return list(ids)
    step = len(ids) / n
    return [ids[int(i * step)] for i in range(n)]


def source_dataset(args) -> tuple:
    """(VOCLayout, list of ids, description) of the benchmark's source images."""
    from .data.voc import VOCLayout, read_id_list

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
    from .data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(Path(args.work_dir) / "synthetic", num_train=1, num_val=max(args.images, 8), seed=0)
    layout = VOCLayout(root)
    return layout, read_id_list(root / "ImageSets" / "Segmentation" / "val.txt"), f"synthetic demo set ({root})"


def prepare_dataset(src, ids: list, long_side: int, dst: Path):
    """Copy ``ids`` of ``src`` into a VOC-layout root ``dst`` with images resized to ``long_side`` (0 = as they
    are), their masks, a saliency map and a soft map (one-hot of the mask's labelled classes, blurred) per
    image. Returns the VOCLayout of ``dst``. Reuses ``dst`` when it already holds the same selection."""
    from .data.voc import VOCLayout
    from .io import save_cam_dict, save_image, save_label_png

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
    """CAMNet (smaf head) in eval mode; EfficientNet-Lite0 with ImageNet weights when ``pretrained`` (and
    installed), ResNet-38 always randomly initialised. Returns (model, weights description)."""
    from .config import Config
    from .models import build_model

    torch.manual_seed(0)
    weights = "random init"
    cfg = dict(backbone=backbone, pretrained="", output_stride=8, feat_dim=128, head="smaf")
    if backbone == "efficientnet_lite0" and pretrained:
        try:
            model = build_model(Config(dict(cfg, pretrained="imagenet")), num_classes)
            weights = "ImageNet"
        except Exception as err:  # noqa: BLE001 - any weights problem: time with random weights, say so
            LOG.warning("EfficientNet-Lite0 ImageNet weights unavailable (%s): random init", err)
            model = build_model(Config(cfg), num_classes)
    else:
        model = build_model(Config(cfg), num_classes)
        if backbone == "resnet38d":
            weights = "random init (no ResNet-38 weights offline; same cost)"
    return model.to(device).eval(), weights


def fusion_amp_variant(device: torch.device) -> str | None:
    """The AMP mode section a also times our path with: bf16 where the device has fast bf16 kernels."""
    from .cam import cpu_has_fast_bf16

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else None


def fusion_config(layout, work_dir: Path, args, device: torch.device, amp: str = "none"):
    """A stage config pointing at the benchmark dataset (defaults of voc12 otherwise)."""
    from .config import load_config

    overrides = [f"data.root={layout.root}", "data.cls_labels=", "data.labels_txt=", f"work_dir={work_dir}",
                 f"fusion.scales=[{','.join(str(s) for s in args.scales)}]", f"amp={amp}",
                 f"device={device.type}"]
    if args.workers is not None:
        overrides.append(f"num_workers={args.workers}")
    return load_config("voc12", overrides)


# ------------------------------------------------------------------------------------ a. fused maps
@torch.no_grad()
def baseline_fused(model, image: np.ndarray, labels: np.ndarray, scales, flip: bool, device: torch.device,
                   base_long: int = 0):
    """The reference's per-image algorithm: batch 1, one forward per scale and flip, NumPy post-processing.

    ``base_long`` > 0: the scales apply to the image resized to that long side (``fusion.base_long``); the
    maps are still produced at the image's size. Returns (classes, float32 (len(classes), H, W) fused maps)."""
    from .data.transforms import normalize, resize_image

    h, w = image.shape[:2]
    bh, bw = h, w
    if base_long:
        ratio = base_long / max(h, w)
        bh, bw = max(1, round(h * ratio)), max(1, round(w * ratio))
    classes = np.nonzero(labels > 0.5)[0].tolist()
    total = np.zeros((len(classes), h, w), np.float32)
    for s in scales:
        scaled = resize_image(image, (max(1, round(bh * s)), max(1, round(bw * s))))
        for flipped in ((False, True) if flip else (False,)):
            x = normalize(scaled[:, ::-1] if flipped else scaled)
            cam = model(torch.from_numpy(x)[None].to(device))[1][0].float().cpu().numpy()
            if model.has_background:
                e = np.exp(cam - cam.max(0, keepdims=True))
                act = e[:-1] / e.sum(0, keepdims=True)
            else:
                act = np.maximum(cam, 0)
            for i, c in enumerate(classes):
                up = cv2.resize(act[c], (w, h), interpolation=cv2.INTER_LINEAR)
                total[i] += up[:, ::-1] if flipped else up
    if classes:
        total /= total.reshape(len(classes), -1).max(1)[:, None, None] + 1e-5
    return classes, total


def baseline_label(classes: list, maps: np.ndarray, bg_threshold: float) -> np.ndarray:
    if not classes:
        return np.zeros(maps.shape[1:], np.uint8)
    idx = np.concatenate([np.full((1, *maps.shape[1:]), bg_threshold, np.float32), maps]).argmax(0)
    return np.array([0] + [c + 1 for c in classes], np.uint8)[idx]


def run_baseline(model, layout, ids: list, out_dir: Path, scales, flip: bool, device, bg_threshold: float,
                 base_long: int = 0) -> int:
    """The per-image baseline over ``ids``: decode, fuse, write (synchronously) cam_npy/ and cam_png/."""
    from .io import save_cam_dict, save_label_png

    for image_id in ids:
        image = layout.load_image(image_id)
        classes, maps = baseline_fused(model, image, layout.labels[image_id], scales, flip, device, base_long)
        label = baseline_label(classes, maps, bg_threshold)
        save_cam_dict(out_dir / "cam_npy" / f"{image_id}.npy", {c: maps[i] for i, c in enumerate(classes)})
        save_label_png(out_dir / "cam_png" / f"{image_id}.png", label)
    return len(ids)


def run_ours(cfg, model, layout, ids: list, out_dir: Path, device) -> int:
    """Our path as a user gets it: stage 3's generate_fused_outputs (loader workers, fused batches,
    background writer), no prototypes, no overlays."""
    from .cam import BackgroundRule
    from .stages.gen_fusion import generate_fused_outputs

    # the baseline mirrors the reference's constant background score
    bg_rule = BackgroundRule("fixed", cfg.fusion.bg_threshold)
    return generate_fused_outputs(cfg, model, layout, ids, out_dir, device, LOG, bg_rule, 0, prototypes=False,
                                  desc="bench: ours")


def compare_outputs(dir_a: Path, dir_b: Path, ids: list) -> dict:
    """Max abs difference of the fused maps and fraction of equal PNG pixels between two output folders."""
    from .io import load_cam_dict, load_label_png

    max_diff, equal, pixels = 0.0, 0, 0
    for image_id in ids:
        a, b = (load_cam_dict(d / "cam_npy" / f"{image_id}.npy") for d in (dir_a, dir_b))
        if sorted(a) != sorted(b):
            return {"max_abs_diff": float("inf"), "png_agreement": 0.0, "error": f"{image_id}: classes differ"}
        for c in a:
            max_diff = max(max_diff, float(np.abs(a[c].astype(np.float64) - b[c]).max()))
        pa, pb = (load_label_png(d / "cam_png" / f"{image_id}.png") for d in (dir_a, dir_b))
        equal += int((pa == pb).sum())
        pixels += pa.size
    return {"max_abs_diff": max_diff, "png_agreement": equal / max(pixels, 1)}


def bench_fusion(backbone: str, layout, ids: list, args, device, scratch: Path, warm_id: str | None) -> dict:
    """Section a for one backbone."""
    model, weights = build_bench_model(backbone, layout.num_classes, device, pretrained=not args.random_init)
    baseline_model = copy.deepcopy(model)  # same weights; our path may switch its copy to channels_last (CUDA)
    cfg = fusion_config(layout, scratch, args, device)
    scales, flip = tuple(cfg.fusion.scales), bool(cfg.fusion.flip)
    base_long = int(cfg.fusion.get("base_long", 0) or 0)
    from .stages.common import default_workers

    amp = None if args.no_amp else fusion_amp_variant(device)
    cfg_amp = fusion_config(layout, scratch, args, device, amp) if amp else None

    def ours(out):
        run_ours(cfg, model, layout, ids, out, device)

    def ours_amp(out):
        run_ours(cfg_amp, model, layout, ids, out, device)

    def base(out):
        run_baseline(baseline_model, layout, ids, out, scales, flip, device, BG_THRESHOLD, base_long)

    paths = [("ours", ours), ("baseline", base)] + ([("ours_amp", ours_amp)] if amp else [])
    warm = [warm_id] if warm_id else ids[:1]
    with torch.no_grad():  # warm-up (excluded): one image through each path
        run_ours(cfg, model, layout, warm, scratch / "warm_ours", device)
        run_baseline(baseline_model, layout, warm, scratch / "warm_base", scales, flip, device, BG_THRESHOLD, base_long)
        if amp:
            run_ours(cfg_amp, model, layout, warm, scratch / "warm_ours_amp", device)
    times = {name: [] for name, _ in paths}
    last = {}
    for r in range(args.repeats):
        order = paths[r % len(paths):] + paths[:r % len(paths)]   # rotate: load changes hit every path
        for name, fn in order:
            out = scratch / f"{backbone}_{name}_{r}"
            times[name].append(timed(lambda: fn(out), device))
            if name in last:
                shutil.rmtree(last[name], ignore_errors=True)
            last[name] = out
    check = compare_outputs(last["ours"], last["baseline"], ids)
    amp_row = None
    if amp:
        check_amp = compare_outputs(last["ours_amp"], last["baseline"], ids)
        amp_ips = len(ids) / median(times["ours_amp"])
        amp_row = {"amp": amp, "images_per_s": amp_ips, "ratio": amp_ips / (len(ids) / median(times["baseline"])),
                   "max_abs_diff": check_amp["max_abs_diff"], "png_agreement": check_amp["png_agreement"],
                   "within_tolerance": bool(check_amp["max_abs_diff"] <= MAX_FUSED_DIFF_AMP)}
    sizes = sorted({tuple(layout.load_image(i).shape[:2]) for i in ids})
    ours_ips = len(ids) / median(times["ours"])
    base_ips = len(ids) / median(times["baseline"])
    ratio = ours_ips / base_ips
    if device.type == "cuda":
        target = GPU_FUSION_TARGET if backbone == "resnet38d" else None
    else:
        target = CPU_FUSION_TARGET if backbone == "efficientnet_lite0" else None
    return {"backbone": backbone, "weights": weights, "num_images": len(ids), "image_sizes": [list(s) for s in sizes],
            "scales": list(scales), "flip": flip, "loader_workers": default_workers(cfg.num_workers),
            "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "ours_images_per_s": ours_ips, "baseline_images_per_s": base_ips, "ratio": ratio,
            "target_ratio": target, "pass": None if target is None else bool(ratio >= target),
            "max_abs_diff": check["max_abs_diff"], "png_agreement": check["png_agreement"],
            "outputs_match": bool(check["max_abs_diff"] <= MAX_FUSED_DIFF), "amp_variant": amp_row,
            "output_dirs": {k: str(v) for k, v in last.items()}}


# -------------------------------------------------------------------------------------------- b. CRF
def bench_crf(layout, ids: list, mask_dir: Path, args, scratch: Path, mask_source: str) -> dict:
    from .crf import CRFParams
    from .stages.crf import refine_folder

    cores = available_cores()
    pool = args.crf_workers or cores
    params = CRFParams()
    refine_folder(layout, mask_dir, scratch / "crf_warm", ids[:1], params, 1, desc="bench: crf warm-up")
    times = {"single": [], "pool": []}
    for r in range(args.repeats):
        order = (("single", 1), ("pool", pool)) if r % 2 == 0 else (("pool", pool), ("single", 1))
        for name, workers in order:
            out = scratch / f"crf_{name}_{r}"
            start = time.perf_counter()
            refine_folder(layout, mask_dir, out, ids, params, workers, desc=f"bench: crf x{workers}")
            times[name].append(time.perf_counter() - start)
            shutil.rmtree(out, ignore_errors=True)
    single = len(ids) / median(times["single"])
    pooled = len(ids) / median(times["pool"])
    target = CRF_POOL_EFFICIENCY * pool * single
    sizes = sorted({tuple(layout.load_image(i).shape[:2]) for i in ids})
    return {"num_images": len(ids), "masks": mask_source, "image_sizes": [list(s) for s in sizes], "cores": cores,
            "pool_workers": pool, "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "single_images_per_s": single, "pool_images_per_s": pooled, "speedup": pooled / single,
            "target_speedup": CRF_POOL_EFFICIENCY * pool, "target_images_per_s": target, "pass": bool(pooled >= target)}


# ------------------------------------------------------------------------------------- c. evaluation
def bench_eval_section(layout, ids: list, args) -> dict:
    from .bench_eval import bench_evaluation
    from .data.voc import VOC_CLASSES, read_id_list

    voc = shared_root() / "data" / "voc12"
    if (voc / "SegmentationClassAug_val").is_dir() and (voc / "val.txt").is_file() and not args.data:
        gt_dir, eval_ids = voc / "SegmentationClassAug_val", read_id_list(voc / "val.txt")
        names, source = ["background"] + list(VOC_CLASSES), "real VOC12 val masks"
    else:
        gt_dir, eval_ids = layout.mask_dir, list(ids)
        names, source = ["background"] + list(layout.class_names), "benchmark images' masks"
    # one extra run first: it warms the file cache and is excluded from the median
    res = bench_evaluation(gt_dir, eval_ids, names, repeats=args.repeats + 1)
    times = res["times_s"][1:]
    return {"source": source, "gt_dir": str(gt_dir), "num_images": len(eval_ids), "threads": res["workers"],
            "times_s": times, "images_per_s": len(eval_ids) / median(times), "miou": res["miou"]}


# -------------------------------------------------------------------------------------- d. training
def training_batches(layout, ids: list, crop: int, batch_size: int, count: int, stage: int) -> list:
    """``count`` collated batches of the real training datasets (stage 0: EPS saliency + jitter; stage 2:
    soft maps + the whole image for the teacher), prepared before timing."""
    from .data.transforms import JointTrainTransform
    from .data.voc import ClassificationDataset, collate_train

    resize = (max(16, round(crop * 256 / 448)), round(crop * 512 / 448))
    if stage == 0:
        dataset = ClassificationDataset(layout, ids, JointTrainTransform(crop, resize, flip=True,
                                                                         jitter=(0.3, 0.3, 0.3, 0.1)), saliency=True)
    else:
        dataset = ClassificationDataset(layout, ids, JointTrainTransform(crop, resize, flip=True, jitter=None),
                                        soft_dir=layout.root / "soft", full_size=crop)
    batches = []
    for b in range(count):
        keys = [((b * batch_size + j) % len(ids), 1000 * b + j) for j in range(batch_size)]
        batches.append(collate_train([dataset[k] for k in keys]))
    return batches


def bench_training(backbone: str, stage: int, layout, ids: list, crop: int, batch_size: int, amp: str, args,
                   device) -> dict:
    """Images/s and peak memory of ``iters`` full training iterations (step + backward + optimiser [+ EMA])."""
    from .cam import autocast_context
    from .engine import optimisation_step
    from .optim import build_poly_sgd
    from .stages import train_cls, train_fusion

    model, weights = build_bench_model(backbone, layout.num_classes, device, pretrained=not args.random_init)
    model.train()
    after_step = None
    if stage == 0:
        step = train_cls.make_step("eps", layout.num_classes, 0.4, 0.5, device)
    else:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        bank = train_fusion.PrototypeBank(torch.rand(layout.num_classes + 1, model.feat_dim, generator=g).to(device),
                                          1e-4)
        from .config import load_config

        sect = load_config("voc12").train_fusion  # the stage's defaults (denoise as configured)
        step, after_step = train_fusion.make_step(model, teacher, bank, layout.num_classes,
                                                  crop // sect.target_stride, sect.bg_score, sect.loss_weight,
                                                  sect.denoise, sect.ema, device)
    optimizer = build_poly_sgd(model.param_groups(), lr=0.01, weight_decay=5e-4, momentum=0.0, max_step=100000)
    scaler = torch.amp.GradScaler("cuda", enabled=(device.type == "cuda" and amp == "fp16"))
    batches = training_batches(layout, ids, crop, batch_size, 2, stage)

    def iteration(t):
        with autocast_context(device, amp):
            loss, _ = step(model, batches[t % len(batches)], t)
        optimisation_step(optimizer, scaler, loss, after_step, t)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset = rss_peak_reset()
    t = 0
    for _ in range(args.train_warmup):
        iteration(t)
        t += 1
    rates = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(args.train_iters):
            iteration(t)
            t += 1
        sync(device)
        rates.append(args.train_iters * batch_size / (time.perf_counter() - start))
    out = {"stage": stage, "backbone": backbone, "weights": weights, "crop": crop, "batch_size": batch_size,
           "amp": amp, "iterations_per_run": args.train_iters, "warmup_iterations": args.train_warmup,
           "images_per_s_runs": [round(r, 4) for r in rates], "images_per_s": median(rates)}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    else:  # VmHWM since the reset above; else the process's getrusage maxrss (whole life)
        peak = rss_peak_bytes() if reset else None
        out["peak_rss_bytes"] = peak if peak is not None else maxrss_bytes()
        out["peak_rss_kind"] = "VmHWM of this measure" if peak is not None else "getrusage maxrss of the process"
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------- output
def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "torch_threads": torch.get_num_threads(), "cv2_threads": cv2.getNumThreads(), "cores": available_cores(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
           "cpu": platform.processor() or platform.machine(), "load_average": load_average()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        env["tf32"] = "off in section a (fp32 comparison), PyTorch defaults elsewhere"
    return env


def _row(cells, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"smaf benchmark | device {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else "") +
             f" | torch {env['torch']} | {env['torch_threads']} torch threads, {env['cores']} cores, OMP_WAIT_POLICY "
             f"{env['omp_wait_policy']} | "
             f"load average {env['load_average']} -> {report.get('load_average_end')}",
             f"data: {report['data']} | {report['repeats']} timed runs per measure (median), warm-up excluded"]
    if "fusion" in report:
        lines += ["", "a. fused maps (scales x flip, files written): our path vs per-image baseline"]
        w = (19, 12, 16, 10, 10, 7, 13, 12, 20)
        lines.append(_row(["backbone", "images", "sizes (HxW)", "ours im/s", "base im/s", "ratio", "max|diff|",
                           "target", "result"], w))
        for r in report["fusion"]:
            sizes = r["image_sizes"]
            size = f"{sizes[0][0]}x{sizes[0][1]}" + (f"..{sizes[-1][0]}x{sizes[-1][1]}" if len(sizes) > 1 else "")
            target = f">= {r['target_ratio']}x" if r["target_ratio"] else "(info)"
            ok = "PASS" if r["pass"] else ("MISS" if r["pass"] is False else "-")
            lines.append(_row([r["backbone"], f"{r['num_images']} (w{r['loader_workers']})", size,
                               f"{r['ours_images_per_s']:.3f}", f"{r['baseline_images_per_s']:.3f}",
                               f"{r['ratio']:.2f}x", f"{r['max_abs_diff']:.2e}", target,
                               f"{ok}; maps {'equal' if r['outputs_match'] else 'DIFFER'}"], w))
            a = r.get("amp_variant")
            if a:
                lines.append(_row([f"  + ours amp {a['amp']}", "", "", f"{a['images_per_s']:.3f}", "",
                                   f"{a['ratio']:.2f}x", f"{a['max_abs_diff']:.2e}", f"<= {MAX_FUSED_DIFF_AMP:g}",
                                   "within" if a["within_tolerance"] else "OUTSIDE tolerance"], w))
        if report["environment"]["device"] == "cpu":
            lines.append("   target on GPU (ResNet-38 >= 5x): not measured: no GPU")
    if "crf" in report:
        c = report["crf"]
        lines += ["", f"b. dense CRF on {c['num_images']} masks ({c['masks']}), images {c['image_sizes'][0][0]}x"
                      f"{c['image_sizes'][0][1]}..: 1 worker vs pool of {c['pool_workers']} ({c['cores']} cores)",
                  f"   1 worker {c['single_images_per_s']:.2f} im/s | pool {c['pool_images_per_s']:.2f} im/s | "
                  f"speedup {c['speedup']:.2f}x | target {c['target_speedup']:.2f}x "
                  f"(0.9 x {c['pool_workers']} workers) | {verdict(c['pass'])}"]
    if "evaluation" in report:
        e = report["evaluation"]
        lines += ["", f"c. evaluation ({e['source']}, {e['num_images']} masks against themselves, {e['threads']} "
                      f"threads): {e['images_per_s']:.1f} images/s (runs {e['times_s']} s)"]
    if "training" in report:
        lines += ["", "d. training iterations (step + backward + SGD [+ EMA/prototypes]), batches prepared in "
                      "memory"]
        w = (7, 19, 12, 7, 10, 32)
        lines.append(_row(["stage", "backbone", "batch x crop", "amp", "images/s", "peak memory"], w))
        for r in report["training"]:
            if "error" in r:
                lines.append(_row([r["stage"], r["backbone"], f"{r['batch_size']} x {r['crop']}", r["amp"], "-",
                                   r["error"][:60]], w))
                continue
            if "peak_allocated_bytes" in r:
                mem = f"{gib(r['peak_allocated_bytes'])} alloc ({gib(r['peak_reserved_bytes'])} reserved)"
            else:
                mem = f"peak RSS {gib(r['peak_rss_bytes'])}"
            lines.append(_row([r["stage"], r["backbone"], f"{r['batch_size']} x {r['crop']}", r["amp"],
                               f"{r['images_per_s']:.2f}", mem], w))
        if report["environment"]["device"] == "cpu":
            lines.append("   CPU: fp16 autocast is CUDA-only; bf16 rows only on CPUs with native bf16 kernels")
    if "targets" in report:
        lines += ["", "targets:"]
        for t in report["targets"]:
            lines.append(f"   {verdict(t['pass']) if t['pass'] is not None else 'n/a ':5} {t['name']}: {t['detail']}")
    return "\n".join(lines)


def collect_targets(report: dict, device: torch.device) -> list:
    targets = []
    for r in report.get("fusion", []):
        if r["target_ratio"]:
            where = "GPU" if device.type == "cuda" else "CPU"
            targets.append({"name": f"fused maps {r['backbone']} on {where} >= {r['target_ratio']}x baseline",
                            "pass": r["pass"], "detail": f"measured {r['ratio']:.2f}x"})
        targets.append({"name": f"fused maps {r['backbone']}: both paths give the same maps (<= {MAX_FUSED_DIFF:g})",
                        "pass": r["outputs_match"], "detail": f"max abs diff {r['max_abs_diff']:.2e}"})
        a = r.get("amp_variant")
        if a:
            targets.append({"name": f"fused maps {r['backbone']} with amp {a['amp']}: within {MAX_FUSED_DIFF_AMP:g} "
                                    f"of the fp32 baseline", "pass": a["within_tolerance"],
                            "detail": f"max abs diff {a['max_abs_diff']:.2e}, {a['ratio']:.2f}x the baseline "
                                      f"({a['png_agreement'] * 100:.2f}% equal PNG pixels)"})
    if device.type != "cuda" and "fusion" in report:
        targets.append({"name": "fused maps ResNet-38 on GPU >= 5x baseline", "pass": None,
                        "detail": "not measured: no GPU"})
    if "crf" in report:
        c = report["crf"]
        targets.append({"name": "CRF pool >= 0.9 x cores x single-worker rate", "pass": c["pass"],
                        "detail": f"{c['pool_images_per_s']:.2f} im/s vs target {c['target_images_per_s']:.2f} "
                                  f"({c['speedup']:.2f}x of {c['target_speedup']:.2f}x)"})
    if "training" in report or "d" in report.get("sections", []):
        rows = [r for r in report.get("training", []) if r["backbone"] == "resnet38d" and r["amp"] != "none"
                and r["batch_size"] >= 8 and r["crop"] >= 448 and ("peak_allocated_bytes" in r or "error" in r)]
        if device.type != "cuda":
            targets.append({"name": "training batch 8 crop 448 ResNet-38 with AMP fits in 24 GB", "pass": None,
                            "detail": "not measured: no GPU"})
        elif any("error" in r for r in rows):
            targets.append({"name": "training batch 8 crop 448 ResNet-38 with AMP fits in 24 GB", "pass": False,
                            "detail": "; ".join(f"stage {r['stage']} {r['amp']}: {r['error']}" for r in rows
                                                if "error" in r)})
        elif rows:
            worst = max(r["peak_reserved_bytes"] for r in rows)
            targets.append({"name": "training batch 8 crop 448 ResNet-38 with AMP fits in 24 GB",
                            "pass": bool(worst + CUDA_CONTEXT_ALLOWANCE <= GPU_MEMORY_BUDGET),
                            "detail": f"worst peak reserved {gib(worst)} + ~1 GiB CUDA context vs 24 GiB"})
        else:
            targets.append({"name": "training batch 8 crop 448 ResNet-38 with AMP fits in 24 GB", "pass": None,
                            "detail": "not measured: run section d with resnet38d, batch 8, crop 448"})
    return targets


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m smaf.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="a,b,c,d", help="subset of a,b,c,d (default all)")
    p.add_argument("--backbones", default=",".join(BACKBONES), help="comma list (default both)")
    p.add_argument("--images", type=int, default=None, help="images (default 16 on CPU, 64 on CUDA)")
    p.add_argument("--r38-images", type=int, default=None,
                   help="images for ResNet-38 (default: 1 on CPU, where one image costs ~15-30 s, else --images)")
    p.add_argument("--size", type=int, default=None,
                   help="long side of the images for EfficientNet-Lite0, CRF and training data (default 160 on "
                        "CPU, 500 on CUDA; 0 = as they are)")
    p.add_argument("--r38-size", type=int, default=None, help="long side for ResNet-38 (default 160 CPU, 500 CUDA)")
    p.add_argument("--crf-size", type=int, default=500,
                   help="long side of the CRF images (default 500, VOC's; the masks are section a's PNGs when "
                        "a ran at this size, else the ground-truth masks)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median reported)")
    p.add_argument("--workers", type=int, default=None, help="loader workers of our path (default: the config's, "
                                                             "capped by the cores)")
    p.add_argument("--crf-workers", type=int, default=0, help="pool size of section b (0 = cores)")
    p.add_argument("--scales", default=",".join(str(s) for s in SCALES))
    p.add_argument("--train-batch", type=int, default=None, help="batch size (default 8; ResNet-38 on CPU 2)")
    p.add_argument("--train-crop", type=int, default=None, help="crop (default 448 on CUDA, 160 on CPU; "
                                                                "ResNet-38 on CPU 96)")
    p.add_argument("--train-iters", type=int, default=None, help="iterations per timed run (default 1 CPU, 10 CUDA)")
    p.add_argument("--train-warmup", type=int, default=None, help="warm-up iterations (default 1 CPU, 3 CUDA)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--data", default="", help="a VOC-layout root to use instead of the Pet subset")
    p.add_argument("--list", default="", help="split list of --data (default its val.txt)")
    p.add_argument("--random-init", action="store_true", help="EfficientNet-Lite0 without ImageNet weights")
    p.add_argument("--no-amp", action="store_true",
                   help="section a: skip the extra run of our path with autocast (bf16 on CUDA and on CPUs with "
                        "AVX512-BF16/AMX, else fp16 on CUDA); section d on CPU: skip the bf16 rows")
    p.add_argument("--work-dir", default="work_dirs/bench", help="prepared data and scratch outputs")
    p.add_argument("--out", default=None, help="JSON report (default <work-dir>/bench.json)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; valid: {','.join(SECTIONS)}")
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    bad = [b for b in args.backbones if b not in BACKBONES]
    if bad:
        p.error(f"--backbones: unknown {bad}; valid: {','.join(BACKBONES)}")
    args.scales = [float(s) for s in args.scales.split(",")]
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        p.error("--device cuda: CUDA is not available")
    on_gpu = args.device == "cuda"
    args.images = args.images or (64 if on_gpu else 16)
    args.r38_images = args.r38_images or (args.images if on_gpu else 1)
    args.size = args.size if args.size is not None else (500 if on_gpu else 160)
    args.r38_size = args.r38_size if args.r38_size is not None else (500 if on_gpu else 160)
    args.train_iters = args.train_iters or (10 if on_gpu else 1)
    args.train_warmup = args.train_warmup if args.train_warmup is not None else (3 if on_gpu else 1)
    args.repeats = max(1, args.repeats)
    args.out = args.out or str(Path(args.work_dir) / "bench.json")
    return args


def train_settings(backbone: str, args, device) -> tuple:
    if device.type == "cuda":
        return args.train_batch or 8, args.train_crop or 448
    if backbone == "resnet38d":
        return args.train_batch or 2, args.train_crop or 96
    return args.train_batch or 8, args.train_crop or 160


def run(args) -> dict:
    device = torch.device(args.device)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    src, all_ids, description = source_dataset(args)
    ids = _pick_ids(all_ids, args.images)
    report = {"environment": environment(device), "data": f"{description}: {len(ids)} images",
              "repeats": args.repeats, "sections": args.sections, "backbones": args.backbones,
              "args": {k: v for k, v in vars(args).items()}}
    layouts = {}

    def layout_for(long_side: int, n: int):
        key = (long_side, n)
        if key not in layouts:
            sel = ids[:n]
            dst = work / "data" / f"{Path(str(src.root)).name}_{long_side or 'orig'}_{n}"
            layouts[key] = prepare_dataset(src, sel, long_side, dst), sel
        return layouts[key]

    scratch = Path(tempfile.mkdtemp(prefix="smaf_bench_", dir=work))
    try:
        if "a" in args.sections:
            report["fusion"] = []
            # fp32 means fp32 for the comparison: TF32 convolutions differ between batch 1 and 2 by ~1e-3
            tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            for backbone in args.backbones:
                r38 = backbone == "resnet38d"
                layout, sel = layout_for(args.r38_size if r38 else args.size, args.r38_images if r38 else args.images)
                warm = sel[0] if device.type == "cuda" else WARMUP_ID  # CUDA: warm the real shapes
                print(f"[a] fused maps, {backbone}: {len(sel)} images ...", file=sys.stderr, flush=True)
                report["fusion"].append(bench_fusion(backbone, layout, sel, args, device, scratch / backbone, warm))
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        if "b" in args.sections:
            layout, sel = layout_for(args.crf_size, args.images)
            fused = next((r for r in report.get("fusion", []) if r["backbone"] == "efficientnet_lite0"
                          and r["num_images"] == len(sel) and args.size == args.crf_size), None)
            if fused:
                mask_dir, source = Path(fused["output_dirs"]["ours"]) / "cam_png", "section a's fused-map PNGs"
            else:
                mask_dir, source = layout.mask_dir, "ground-truth masks"
            print(f"[b] CRF: {len(sel)} images ...", file=sys.stderr, flush=True)
            report["crf"] = bench_crf(layout, sel, mask_dir, args, scratch, source)
        if "c" in args.sections:
            layout, sel = layout_for(args.size, args.images)
            print("[c] evaluation ...", file=sys.stderr, flush=True)
            report["evaluation"] = bench_eval_section(layout, sel, args)
        if "d" in args.sections:
            report["training"] = []
            from .cam import cpu_has_fast_bf16

            if device.type == "cuda":
                amps = ("none", "fp16", "bf16")
            else:   # fp16 autocast is CUDA-only here; bf16 where the CPU has native kernels
                amps = ("none", "bf16") if cpu_has_fast_bf16() and not args.no_amp else ("none",)
            for backbone in args.backbones:
                layout, sel = layout_for(args.size, args.images)
                batch, crop = train_settings(backbone, args, device)
                for stage in (0, 2):
                    for amp in amps:
                        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                            continue
                        print(f"[d] training stage {stage}, {backbone}, amp {amp} ...", file=sys.stderr, flush=True)
                        try:
                            row = bench_training(backbone, stage, layout, sel, crop, batch, amp, args, device)
                        except torch.cuda.OutOfMemoryError as err:  # a row saying so, not a lost report
                            torch.cuda.empty_cache()
                            row = {"stage": stage, "backbone": backbone, "crop": crop, "batch_size": batch,
                                   "amp": amp, "error": f"out of memory: {str(err).splitlines()[0]}"}
                        report["training"].append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for r in report.get("fusion", []):
        r.pop("output_dirs", None)
    report["targets"] = collect_targets(report, device)
    report["load_average_end"] = load_average()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    report = run(args)
    text = format_report(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nJSON report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
