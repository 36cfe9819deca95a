"""Evaluation: the library (:mod:`.folder`: score a folder of label PNGs or CAM dicts, sweep the background
threshold, write reports), the curve plot (:mod:`.plot`) and the command line (:mod:`.cli`,
``python -m smaf.evaluate``)."""
from .cli import main
from .folder import (DEFAULT_BG, DEFAULT_THRESHOLDS, GT_TUNED_LABEL, best_threshold, evaluate_folder,
                     sweep_confusions, threshold_curve, write_curve_csv, write_report)
from .plot import plot_curve

__all__ = ["DEFAULT_BG", "DEFAULT_THRESHOLDS", "GT_TUNED_LABEL", "best_threshold", "evaluate_folder", "main",
           "plot_curve", "sweep_confusions", "threshold_curve", "write_curve_csv", "write_report"]
