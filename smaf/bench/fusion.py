"""Section a: fused-map generation, our path against a per-image baseline written after the reference loop."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch

from ..amp import cpu_has_fast_bf16
from ..cam.background import BackgroundRule
from ..cam.writer import generate_fused_outputs
from ..config import load_config
from ..data.transforms import normalize, resize_image
from ..io import load_cam_dict, load_label_png, save_cam_dict, save_label_png
from ..run_layout import CAM_NPY, CAM_PNG
from ..runtime import default_workers
from .common import (BG_THRESHOLD, CPU_FUSION_TARGET, GPU_FUSION_TARGET, LOG, MAX_FUSED_DIFF, MAX_FUSED_DIFF_AMP,
                     build_bench_model, median, timed)


def fusion_amp_variant(device: torch.device) -> str | None:
    """The AMP mode section a also times our path with: bf16 where the device has fast bf16 kernels."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else None


def fusion_config(layout, work_dir: Path, args, device: torch.device, amp: str = "none"):
    """A stage config pointing at the benchmark dataset (defaults of voc12 otherwise)."""
    overrides = [f"data.root={layout.root}", "data.cls_labels=", "data.labels_txt=", f"work_dir={work_dir}",
                 f"inference.scales=[{','.join(str(s) for s in args.scales)}]", f"amp={amp}",
                 f"device={device.type}"]
    if args.workers is not None:
        overrides.append(f"num_workers={args.workers}")
    return load_config("voc12", overrides)


@torch.no_grad()
def baseline_fused(model, image: np.ndarray, labels: np.ndarray, scales, flip: bool, device: torch.device,
                   base_long: int = 0, resize: str = "pil"):
    """The reference's per-image algorithm: batch 1, one forward per scale and flip, NumPy post-processing.

    ``base_long`` > 0: the scales apply to the image resized to that long side (``inference.base_long``); the
    maps are still produced at the image's size; ``resize``: the image resize (``inference.resize``; the
    reference's is PIL bicubic). Returns (classes, float32 (len(classes), H, W) fused maps)."""
    h, w = image.shape[:2]
    bh, bw = h, w
    if base_long:
        ratio = base_long / max(h, w)
        bh, bw = max(1, round(h * ratio)), max(1, round(w * ratio))
    classes = np.nonzero(labels > 0.5)[0].tolist()
    total = np.zeros((len(classes), h, w), np.float32)
    for s in scales:
        scaled = resize_image(image, (max(1, round(bh * s)), max(1, round(bw * s))), resize)
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
                 base_long: int = 0, resize: str = "pil") -> int:
    """The per-image baseline over ``ids``: decode, fuse, write (synchronously) cam_npy/ and cam_png/."""
    for image_id in ids:
        image = layout.load_image(image_id)
        classes, maps = baseline_fused(model, image, layout.labels[image_id], scales, flip, device, base_long,
                                       resize)
        label = baseline_label(classes, maps, bg_threshold)
        save_cam_dict(out_dir / CAM_NPY / f"{image_id}.npy", {c: maps[i] for i, c in enumerate(classes)})
        save_label_png(out_dir / CAM_PNG / f"{image_id}.png", label)
    return len(ids)


def run_ours(cfg, model, layout, ids: list, out_dir: Path, device) -> int:
    """Our path as a user gets it: stage 3's generate_fused_outputs (loader workers, fused batches,
    background writer), no prototypes, no overlays."""
    # the baseline mirrors the reference's constant background score
    bg_rule = BackgroundRule("fixed", cfg.inference.bg_threshold)
    return generate_fused_outputs(model, layout, ids, out_dir, device, LOG, cfg.inference, bg_rule, amp=cfg.amp,
                                  num_workers=cfg.num_workers, desc="bench: ours")


def compare_outputs(dir_a: Path, dir_b: Path, ids: list) -> dict:
    """Max abs difference of the fused maps and fraction of equal PNG pixels between two output folders."""
    max_diff, equal, pixels = 0.0, 0, 0
    for image_id in ids:
        a, b = (load_cam_dict(d / CAM_NPY / f"{image_id}.npy") for d in (dir_a, dir_b))
        if sorted(a) != sorted(b):
            return {"max_abs_diff": float("inf"), "png_agreement": 0.0, "error": f"{image_id}: classes differ"}
        for c in a:
            max_diff = max(max_diff, float(np.abs(a[c].astype(np.float64) - b[c]).max()))
        pa, pb = (load_label_png(d / CAM_PNG / f"{image_id}.png") for d in (dir_a, dir_b))
        equal += int((pa == pb).sum())
        pixels += pa.size
    return {"max_abs_diff": max_diff, "png_agreement": equal / max(pixels, 1)}


def bench_fusion(backbone: str, layout, ids: list, args, device, scratch: Path, warm_id: str | None) -> dict:
    """Section a for one backbone."""
    model, weights = build_bench_model(backbone, layout.num_classes, device, pretrained=not args.random_init)
    baseline_model = copy.deepcopy(model)  # same weights; our path may switch its copy to channels_last (CUDA)
    cfg = fusion_config(layout, scratch, args, device)
    scales, flip = tuple(cfg.inference.scales), bool(cfg.inference.flip)
    base_long = int(cfg.inference.base_long or 0)
    resize = str(cfg.inference.resize)
    amp = None if args.no_amp else fusion_amp_variant(device)
    cfg_amp = fusion_config(layout, scratch, args, device, amp) if amp else None

    def ours(out):
        run_ours(cfg, model, layout, ids, out, device)

    def ours_amp(out):
        run_ours(cfg_amp, model, layout, ids, out, device)

    def base(out):
        run_baseline(baseline_model, layout, ids, out, scales, flip, device, BG_THRESHOLD, base_long, resize)

    paths = [("ours", ours), ("baseline", base)] + ([("ours_amp", ours_amp)] if amp else [])
    warm = [warm_id] if warm_id else ids[:1]
    with torch.no_grad():  # warm-up (excluded): one image through each path
        run_ours(cfg, model, layout, warm, scratch / "warm_ours", device)
        run_baseline(baseline_model, layout, warm, scratch / "warm_base", scales, flip, device, BG_THRESHOLD,
                     base_long, resize)
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
