"""AFA inference (``python -m smaf.stages.infer_afa`` / ``bash script/infer_afa.sh``; docs/afa.md): the stage-4
inference path (:func:`smaf.seg.run_list.run_section`) on the decoder of a trained AFA network.

Loads ``infer_afa.checkpoint`` (default: ``train_afa/final.pth``) and, for every id of ``infer_afa.list``
(default ``data.val_list``), averages the softmax of the decoder's upsampled logits over ``infer_afa.scales``
x flip (inputs at long side ``infer_afa.base_long``: AFA's 512), then the dense CRF with AFA's test constants
(related-methods.md §1.5: Gaussian 3/3, bilateral 64/5/4). Writes under ``<work_dir>/<infer_afa.out_subdir>/``
what stage-4 inference writes: ``seg_png/``, ``crf_png/``, ``overlays/``, ``eval/{seg_png,crf_png}.json``
(mIoU on ``infer_afa.eval_list`` when its masks exist), ``speed.json``.
"""
from __future__ import annotations

from ..models.afa import AFA_ARCHITECTURES
from ..runtime import stage_main
from ..seg.run_list import run_section


def run(cfg) -> dict:
    """AFA inference; returns what :func:`smaf.seg.run_list.run_section` does."""
    return run_section(cfg, "infer_afa", AFA_ARCHITECTURES)


def main(argv=None):
    stage_main(run, "AFA inference: multi-scale x flip segmentation (+ dense CRF) of a list, with evaluation.", argv)


if __name__ == "__main__":
    main()
