"""Benchmark of the evaluation path: a folder of masks scored against itself (``python -m smaf.bench_eval``).

Scoring a folder against itself reads every PNG twice and runs the full confusion-matrix path, which is
what every stage's evaluation costs; the result must be mIoU 100 (checked, so a fast wrong answer fails).

Example::

    python -m smaf.bench_eval --gt ../shared/data/voc12/SegmentationClassAug_val --list ../shared/data/voc12/val.txt
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from .evaluate import evaluate_folder


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


def main(argv: list[str] | None = None) -> int:
    """CLI: print the median time and images/s; one ``error: ...`` line and exit 2 on a user error."""
    from .data.voc import DatasetError, load_class_names, read_id_list

    parser = argparse.ArgumentParser(prog="python -m smaf.bench_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="folder of <id>.png masks")
    parser.add_argument("--list", help="split list (default: every mask of --gt)")
    parser.add_argument("--labels", help="labels.txt with the class names (default: VOC's 20)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        gt_dir = Path(args.gt)
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"mask folder '{gt_dir}' not found: fix --gt")
        ids = read_id_list(args.list) if args.list else sorted(p.stem for p in gt_dir.glob("*.png"))
        if args.labels and not Path(args.labels).is_file():
            raise FileNotFoundError(f"class names file '{args.labels}' not found: fix --labels")
        class_names = ["background"] + load_class_names(args.labels)
        res = bench_evaluation(gt_dir, ids, class_names, repeats=args.repeats, workers=args.workers)
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"evaluation benchmark: {res['num_images']} masks against themselves, {res['workers']} threads, "
          f"runs {res['times_s']} s")
    print(f"median {res['median_s']:.3f} s, {res['images_per_s']:.1f} images/s (mIoU {res['miou']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
