"""The benchmark report: environment, the table printed on stdout, and the targets."""
from __future__ import annotations

import os
import platform

import cv2
import torch

from ..runtime import available_cores
from .common import CUDA_CONTEXT_ALLOWANCE, GPU_MEMORY_BUDGET, MAX_FUSED_DIFF, MAX_FUSED_DIFF_AMP, gib, load_average, verdict


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
    if "refiners" in report:
        from .refine import format_refiners

        lines += ["", "e. affinity " + format_refiners(report["refiners"]),
                  "   (synthetic textured images with smooth CAMs: the cost depends on size and class count only)"]
    if "a2gnn" in report:
        from .refine import format_a2gnn

        lines += ["", "e. " + format_a2gnn(report["a2gnn"])]
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
    if "refiners" in report:
        r = report["refiners"]
        where = "GPU" if device.type == "cuda" else "CPU"
        targets.append({"name": f"random walk of one VOC-sized image on {where} < {1000 * r['rw_target_s']:.0f} ms "
                                f"(walk, network excluded)", "pass": r["rw_pass"],
                        "detail": f"{1000 * r['rw_walk']['seconds_per_image']:.1f} ms (network "
                                  f"{1000 * r['rw_network']['seconds_per_image']:.1f} ms, PAR "
                                  f"{1000 * r['par']['seconds_per_image']:.1f} ms)"})
        if device.type != "cuda":
            targets.append({"name": "random walk of one VOC-sized image on GPU < 50 ms", "pass": None,
                            "detail": "not measured: no GPU"})
    return targets
