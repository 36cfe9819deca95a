"""Section d: training iterations of stages 0 and 2 (images/s, peak memory)."""
from __future__ import annotations

import time

import torch

from ..amp import autocast_context
from ..config import derive, load_config
from ..data.transforms import JointTrainTransform
from ..data.voc import ClassificationDataset, collate_train
from ..engine import optimisation_step
from ..methods import get_method
from ..optim import build_optimizer
from ..stages.train_fusion import SelfTrainingTarget, build_self_training
from .common import build_bench_model, maxrss_bytes, median, rss_peak_bytes, rss_peak_reset, sync


def training_batches(layout, ids: list, crop: int, batch_size: int, count: int, stage: int) -> list:
    """``count`` collated batches of the real training datasets (stage 0: EPS saliency + jitter; stage 2:
    soft maps + the whole image for the teacher), prepared before timing."""
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
    model, weights = build_bench_model(backbone, layout.num_classes, device, pretrained=not args.random_init)
    model.train()
    # the stages' own defaults (voc12): the EPS method, and stage 2 as configured (denoise included)
    cfg = derive(load_config("voc12"), train_fusion__crop=crop)
    after_step = None
    if stage == 0:
        step = get_method("eps").make_step(cfg.train_cls.eps, layout.num_classes, device)
        sect = cfg.train_cls
    else:
        sect = cfg.train_fusion
        g = torch.Generator().manual_seed(0)
        prototypes = torch.rand(layout.num_classes + 1, model.feat_dim, generator=g)
        target = SelfTrainingTarget(sect, layout.num_classes, crop // sect.target_stride)
        _, _, step, after_step = build_self_training(model, sect, target, prototypes,
                                                     cfg.fusion.prototype_min_pixels, device)
    optimizer = build_optimizer(sect, model.param_groups(), 100000)
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
    return out   # the model, optimiser and batches are freed with this frame (the caller empties the CUDA cache)
