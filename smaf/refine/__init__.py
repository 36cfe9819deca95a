"""Refinement of CAMs and label maps, method-neutral: per-image refiners (:mod:`.crf`: dense CRF of label maps
or soft scores) run over a folder by :func:`.pool.refine_folder`. Random walk, PAR, A2GNN's graph refinement
and AFA's training labels live beside them."""
from .crf import CRFLabelRefiner, CRFParams, CRFScoreRefiner, crf_refine_labels, crf_refine_scores
from .pool import refine_folder

__all__ = ["CRFLabelRefiner", "CRFParams", "CRFScoreRefiner", "crf_refine_labels", "crf_refine_scores",
           "refine_folder"]
