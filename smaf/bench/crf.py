"""Section b: the dense CRF with one worker against the pool."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..refine import CRFLabelRefiner, CRFParams, refine_folder
from ..runtime import available_cores
from .common import CRF_POOL_EFFICIENCY, median


def bench_crf(layout, ids: list, mask_dir: Path, args, scratch: Path, mask_source: str) -> dict:
    cores = available_cores()
    pool = args.crf_workers or cores
    params = CRFLabelRefiner(CRFParams())
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
