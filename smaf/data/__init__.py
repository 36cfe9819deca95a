"""VOC-format data: layouts, datasets, joint transforms, the synthetic demo set and the layout checker."""
from .transforms import JointTrainTransform, normalize, resize_image
from .voc import (VOC_CLASSES, ClassificationDataset, DatasetError, InferenceDataset, SegmentationDataset,
                  VOCLayout, load_class_names, load_cls_labels, read_id_list)

__all__ = ["VOC_CLASSES", "ClassificationDataset", "DatasetError", "InferenceDataset", "JointTrainTransform",
           "SegmentationDataset", "VOCLayout", "load_class_names", "load_cls_labels", "normalize",
           "read_id_list", "resize_image"]
