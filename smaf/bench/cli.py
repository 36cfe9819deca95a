"""``python -m smaf.bench``: arguments, the run over the chosen sections, the JSON report."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..amp import cpu_has_fast_bf16
from .common import BACKBONES, DEFAULT_BACKBONES, SCALES, SECTIONS, WARMUP_ID, _pick_ids, load_average, prepare_dataset, source_dataset
from .crf import bench_crf
from .evaluation import bench_eval_section
from .fusion import bench_fusion
from .refine import bench_a2gnn, bench_refiners
from .refine import synthetic_inputs as synthetic_refiner_inputs
from .report import collect_targets, environment, format_report
from .training import bench_training


_DESCRIPTION = ("Throughput benchmark of the pipeline's hot paths: a fused maps (ours vs a per-image baseline), b CRF "
                "(1 worker vs a pool), c evaluation, d training steps, e the affinity refiners (PAR, random walk, "
                "A2GNN's training) "
                "on VOC-sized images (see smaf/bench/__init__.py).")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m smaf.bench", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="a,b,c,d,e", help="subset of a,b,c,d,e (default all)")
    p.add_argument("--refine-images", type=int, default=None,
                   help="section e: VOC-sized (375 x 500) images for PAR and the random walk (default 4 on CPU, 16 "
                        "on CUDA)")
    p.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                   help=f"comma list of {', '.join(BACKBONES)} (default {','.join(DEFAULT_BACKBONES)}; the "
                        f"transformers at --size like EfficientNet-Lite0)")
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
    args.refine_images = args.refine_images or (16 if on_gpu else 4)
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
    if backbone == "vit_s14_focus":   # a multiple of the patch, as the ViT configs crop (160 would pad to 168)
        return args.train_batch or 8, args.train_crop or 154
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
                        if device.type == "cuda":   # the measure's model and batches are gone with its frame
                            torch.cuda.empty_cache()
        if "e" in args.sections:
            # VOC-sized inputs whatever --data holds: the random walk's target is per 500 x 375 image, and its
            # cost depends on the size and class count only, not on the content
            print(f"[e] refiners: {args.refine_images} VOC-sized images ...", file=sys.stderr, flush=True)
            images, cams = synthetic_refiner_inputs(num_images=args.refine_images)
            report["refiners"] = bench_refiners(images, cams, device=device, repeats=args.repeats)
            print("[e] A2GNN: one VOC-sized graph ...", file=sys.stderr, flush=True)
            report["a2gnn"] = bench_a2gnn(device=device, repeats=args.repeats)
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
