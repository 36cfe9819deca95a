"""smaf: weakly supervised semantic segmentation with multi-scale attention fusion and self-training."""
__version__ = "0.1.0"
