"""CAM inference, by concern:

* :mod:`.fusion`: multi-scale x flip fused attention maps of one image (:func:`fuse_image`);
* :mod:`.background`: the per-image background score (:class:`BackgroundRule`) and label maps;
* :mod:`.prototypes`: class prototypes (per-image class means, aggregation, the stage-2 bank);
* :mod:`.writer`: fused maps, PNGs and prototype statistics of an id list (:func:`~.writer.generate_fused_outputs`);
* :mod:`.report`: evaluation of a stage's PNG folder and its background-score spread;
* :mod:`.validate`: the training stages' CAM validator.

The first three are re-exported here.
"""
from .background import BG_METHODS, BackgroundRule, background_score, label_from_maps, otsu_threshold
from .fusion import FusedResult, cam_activation, fuse_image
from .prototypes import PrototypeBank, aggregate_prototypes, class_feature_means

__all__ = ["BG_METHODS", "BackgroundRule", "FusedResult", "PrototypeBank", "aggregate_prototypes",
           "background_score", "cam_activation", "class_feature_means", "fuse_image", "label_from_maps",
           "otsu_threshold"]
