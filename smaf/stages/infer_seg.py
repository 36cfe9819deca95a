"""Stage 4 inference: the trained segmentation network over a list (``python -m smaf.stages.infer_seg`` /
``bash script/infer_seg.sh``).

Loads ``infer_seg.checkpoint`` (default: ``train_seg/final.pth``) and, for every id of ``infer_seg.list``
(default ``data.val_list``; ids need no image-level labels, so a test list works), averages the softmax of the
network's upsampled logits over ``infer_seg.scales`` (0.5, 0.75, 1) x flip on the device
(:func:`smaf.seg.inference.segment_batch`; inputs at long side ``infer_seg.base_long`` when > 0, probabilities
at the image size), then, with ``infer_seg.crf``, runs the dense CRF of those probabilities in a process pool
(DeepLab's constants ``infer_seg.{gauss_sxy,...}``). Writes under ``<work_dir>/<infer_seg.out_subdir>/``:

    seg_png/<id>.png   the argmax (palette PNG, VOC numbering)
    crf_png/<id>.png   after the CRF (with infer_seg.crf)
    overlays/<id>.jpg  image | prediction | + CRF | classes, for the first infer_seg.overlays ids
    eval/{seg_png,crf_png}.json   mIoU on infer_seg.eval_list when its masks exist and every id was segmented
    speed.json         images, seconds and images/s of this call

and logs the throughput (images/s of the network pass, and with the CRF). Finished images are skipped; under
torchrun each rank takes its share.
"""
from __future__ import annotations

from ..models.deeplab import SEG_ARCHITECTURES
from ..runtime import stage_main
from ..seg.run_list import run_section


def run(cfg) -> dict:
    """Stage 4 inference; returns what :func:`smaf.seg.run_list.run_section` does (val mIoU, folders, speed)."""
    return run_section(cfg, "infer_seg", SEG_ARCHITECTURES)


def main(argv=None):
    stage_main(run, "Stage 4 inference: multi-scale x flip segmentation (+ dense CRF) of a list, with evaluation.",
               argv)


if __name__ == "__main__":
    main()
