"""``cam``: a plain CAM classifier (PSA lineage), multilabel soft margin on the C logits; no saliency."""
from __future__ import annotations

from ..losses import multilabel_soft_margin
from . import ClassifierMethod, register_method


@register_method
class PlainCAM(ClassifierMethod):
    name = "cam"
    head = "cls"

    def loss(self, outputs, batch, labels, opts, num_classes, device):
        return multilabel_soft_margin(outputs[0][:, :num_classes], labels), {}
