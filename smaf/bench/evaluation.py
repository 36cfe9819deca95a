"""Section c: evaluation throughput, a folder of masks scored against itself (also its own command:
``python -m smaf.bench.evaluation --gt DIR [--list FILE]``).

Scoring a folder against itself reads every PNG twice and runs the full confusion-matrix path, which is
what every stage's evaluation costs; the result must be mIoU 100 (checked, so a fast wrong answer fails).

Example::

    python -m smaf.bench.evaluation --gt ../shared/data/voc12/SegmentationClassAug_val --list ../shared/data/voc12/val.txt
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from ..data.voc import VOC_CLASSES, load_class_names, read_id_list
from ..evaluate import evaluate_folder
from ..runtime import expected_errors
from .common import median, shared_root


def bench_evaluation(gt_dir: str | os.PathLike, ids: Sequence[str], class_names: Sequence[str], repeats: int = 3,
                     workers: int | None = None) -> dict:
    """Time :func:`smaf.evaluate.evaluate_folder` of ``gt_dir`` against itself ``repeats`` times.

    Args:
        gt_dir: folder of ``<id>.png`` masks; ids: ids to score; class_names: K names (background first);
        repeats: timed runs (the median is reported; the first run also warms the file cache);
        workers: loader threads (default ``os.cpu_count()``).

    Returns:
        ``{"num_images", "repeats", "workers", "times_s": [...], "median_s", "images_per_s", "miou"}``.

    Raises:
        RuntimeError: the self-evaluation did not give mIoU 100 (the evaluation is broken).
    """
    ids = list(ids)
    times, miou = [], None
    for _ in range(max(1, int(repeats))):
        start = time.perf_counter()
        result = evaluate_folder(gt_dir, gt_dir, ids, class_names, workers=workers, desc="bench")
        times.append(time.perf_counter() - start)
        miou = result["miou"]
        if miou != 100.0:
            raise RuntimeError(f"self-evaluation of '{gt_dir}' gave mIoU {miou}, expected exactly 100.0")
    median = statistics.median(times)
    return {"num_images": len(ids), "repeats": len(times), "workers": workers or os.cpu_count(),
            "times_s": [round(t, 4) for t in times], "median_s": median,
            "images_per_s": len(ids) / median if median > 0 else float("inf"), "miou": miou}


def bench_eval_section(layout, ids: list, args) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    """CLI: print the median time and images/s; one ``error: ...`` line on a user error."""
    parser = argparse.ArgumentParser(prog="python -m smaf.bench.evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="folder of <id>.png masks")
    parser.add_argument("--list", help="split list (default: every mask of --gt)")
    parser.add_argument("--labels", help="labels.txt with the class names (default: VOC's 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    with expected_errors():
        gt_dir = Path(args.gt)
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"mask folder '{gt_dir}' not found: fix --gt")
        ids = read_id_list(args.list) if args.list else sorted(p.stem for p in gt_dir.glob("*.png"))
        if args.labels and not Path(args.labels).is_file():
            raise FileNotFoundError(f"class names file '{args.labels}' not found: fix --labels")
        class_names = ["background"] + load_class_names(args.labels)
        res = bench_evaluation(gt_dir, ids, class_names, repeats=args.repeats, workers=args.workers)
    print(f"evaluation benchmark: {res['num_images']} masks against themselves, {res['workers']} threads, "
          f"runs {res['times_s']} s")
    print(f"median {res['median_s']:.3f} s, {res['images_per_s']:.1f} images/s (mIoU {res['miou']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
