"""Segmentation networks of stage 4: DeepLab-v2 (ASPP) and DeepLab-LargeFOV (v1) heads on any backbone of
:data:`smaf.models.BACKBONES`.

Both take the backbone's ``'conv6'`` feature (B, D, h, w) at its output stride OS (D = ``backbone.out_channels``:
4096 for ``resnet38d`` at OS 8, 1280 for ``efficientnet_lite0`` at OS 8 or 16, 384 for ``vit_s14_focus`` at OS 14,
256 / 512 for ``mit_b0`` / ``mit_b1``-``b5`` at OS 8 or 16) and return per-pixel class logits at the same
resolution::

    deeplab_v2        conv6 -> [3x3 conv D->K, dilation r, bias] for r in (6, 12, 18, 24), summed   (B, K, h, w)
    deeplab_largefov  conv6 -> 3x3 conv D->1024, dilation 12, bias -> ReLU -> Dropout2d 0.5
                            -> 1x1 conv 1024->1024, bias -> ReLU -> Dropout2d 0.5 -> 1x1 conv 1024->K, bias

K = C+1 channels in VOC numbering: channel 0 is the background and channel c+1 class c, the values of a label
PNG, so ``logits.argmax(1)`` is a label map. The dilations are DeepLab's values at output stride 8 (Chen et al.,
TPAMI 2017: ASPP-L 6/12/18/24; DeepLab-v1 LargeFOV: fc6 dilation 12); at another output stride they are scaled
by 8/OS (3/6/9/12 and 6 at OS 16; 3/7/10/14 and 7 at the ViT's OS 14), which keeps each tap at the same distance in image pixels (the feature grid
is twice as coarse). The classifier convs start as DeepLab's do (Gaussian, std 0.01, bias 0); the LargeFOV fc6 /
fc7 convs (pretrained from VGG in DeepLab, new here) start Kaiming-normal.

The backbone keeps its own rules (BatchNorm frozen in eval mode, frozen stem); the heads have no BatchNorm, so
the network trains the same with any batch size and under DDP. ``param_groups()`` lists [backbone weights,
backbone biases, head weights, head biases] for the poly SGD (lr x1 / x2 / x10 / x20, DeepLab's lr_mult).

Weights (``pretrained``, given at build time and never recorded in the architecture's arguments): '' = random
init; ``imagenet`` / a weights file = the backbone's ImageNet weights (as for stage 0, see
:func:`smaf.models.build_backbone`); or a smaf checkpoint of any network on the same backbone, e.g. the stage-0
classifier (``train_cls/final.pth``: the PSA-lineage practice of starting DeepLab from the classifier), whose
``backbone.*`` weights are loaded strictly.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .registry import register_architecture

#: DeepLab's dilations at output stride 8.
ASPP_DILATIONS = (6, 12, 18, 24)
LARGEFOV_DILATION = 12
LARGEFOV_WIDTH = 1024
LARGEFOV_DROPOUT = 0.5
REFERENCE_STRIDE = 8
FEATURE_KEY = "conv6"
SEG_ARCHITECTURES = ("deeplab_v2", "deeplab_largefov")


def scaled_dilations(dilations, output_stride: int) -> list[int]:
    """DeepLab's dilations (given at output stride 8) for ``output_stride``: each times 8 / OS, at least 1
    (6/12/18/24 -> 3/6/9/12 at OS 16)."""
    if int(output_stride) < 1:
        raise ValueError(f"output_stride must be >= 1, got {output_stride}")
    return [max(1, round(int(d) * REFERENCE_STRIDE / int(output_stride))) for d in dilations]


class SegmentationNet(nn.Module):
    """A backbone + a segmentation head (module docstring).

    Args:
        backbone: a module whose ``forward(x)`` returns a dict with ``'conv6'`` (B, D, h, w), with
            ``out_channels`` = D.
        head: the head module, (B, D, h, w) -> (B, K, h, w).
        num_classes: C, the foreground classes (K = C+1 outputs, background first).
        class_names: the C foreground names (for predictions shown to people), or None.

    ``forward(x)``: x (B, 3, H, W) ImageNet-normalised RGB -> logits (B, C+1, ceil(H/OS), ceil(W/OS)) float,
    contiguous. Attributes: ``num_classes`` (C), ``num_outputs`` (K), ``class_names``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int, class_names=None):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"segmentation network: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != int(num_classes):
            raise ValueError(f"segmentation network: {len(class_names)} class names for {num_classes} classes")
        self.backbone = backbone
        self.head = head
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def num_outputs(self) -> int:
        """K = C+1 (background first)."""
        return self.num_classes + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[FEATURE_KEY]).contiguous()

    def train(self, mode: bool = True) -> SegmentationNet:
        super().train(mode)
        self.backbone.train(mode)   # the backbones re-freeze their BatchNorm in their own train()
        return self

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[backbone weights, backbone biases, head weights, head biases] (poly SGD: lr x1, x2, x10, x20).
        Only parameters with ``requires_grad``: frozen BatchNorm and stem convs are in no group."""
        head_ids = {id(p) for p in self.head.parameters()}
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[2 * (id(param) in head_ids) + name.endswith("bias")].append(param)
        return groups


def _classifier_init(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class ASPPHead(nn.Module):
    """DeepLab-v2 ASPP: parallel 3x3 convs D -> K with dilations ``dilations`` (padding = dilation, so the map
    keeps its size), their logits summed. (B, D, h, w) -> (B, K, h, w)."""

    def __init__(self, in_channels: int, num_outputs: int, dilations):
        super().__init__()
        self.dilations = [int(d) for d in dilations]
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"ASPP dilations must be a non-empty list of integers >= 1, got {list(dilations)}")
        self.branches = nn.ModuleList(
            _classifier_init(nn.Conv2d(in_channels, num_outputs, 3, padding=d, dilation=d, bias=True))
            for d in self.dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class LargeFOVHead(nn.Module):
    """DeepLab-v1 LargeFOV: 3x3 conv (dilation ``dilation``) -> ReLU -> dropout -> 1x1 conv -> ReLU -> dropout
    -> 1x1 classifier. (B, D, h, w) -> (B, K, h, w)."""

    def __init__(self, in_channels: int, num_outputs: int, dilation: int = LARGEFOV_DILATION,
                 width: int = LARGEFOV_WIDTH, dropout: float = LARGEFOV_DROPOUT):
        super().__init__()
        if int(dilation) < 1 or int(width) < 1:
            raise ValueError(f"LargeFOV head: dilation and width must be >= 1, got {dilation} and {width}")
        d = int(dilation)
        self.fc6 = nn.Conv2d(in_channels, width, 3, padding=d, dilation=d, bias=True)
        self.fc7 = nn.Conv2d(width, width, 1, bias=True)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.relu = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d(dropout)
        self.drop7 = nn.Dropout2d(dropout)
        self.fc8 = _classifier_init(nn.Conv2d(width, num_outputs, 1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop6(self.relu(self.fc6(x)))
        x = self.drop7(self.relu(self.fc7(x)))
        return self.fc8(x)


# ------------------------------------------------------------------------------------------- weights
def _smaf_checkpoint(path: Path):
    """The loaded checkpoint when ``path`` is a smaf checkpoint (``{'format': 'smaf', ...}``), else None (a
    foreign weights file, read again by the backbone's own loader)."""
    from ..safe_load import torch_load

    if path.suffix not in (".pth", ".pt") or not path.is_file():
        return None
    obj = torch_load(path, "weights file (model.pretrained)")
    return obj if isinstance(obj, dict) and obj.get("format") == "smaf" else None


def backbone_with_weights(name: str, pretrained: str = "", output_stride: int = 8) -> nn.Module:
    """The backbone ``name`` with the weights ``pretrained`` names: '' (random init), ``imagenet`` or a weights
    file (what :func:`smaf.models.build_backbone` loads), or a smaf checkpoint of a network on the same backbone
    (its ``backbone.*`` tensors, loaded strictly; e.g. the stage-0 classifier). A checkpoint of another backbone,
    or one whose tensors do not fit, is a one-line :class:`~smaf.checkpoint.CheckpointError`."""
    from ..checkpoint import CheckpointError, check_state_fits, checked_spec, describe
    from . import build_backbone

    pretrained = str(pretrained or "")
    ckpt = _smaf_checkpoint(Path(pretrained)) if pretrained and pretrained != "imagenet" else None
    if ckpt is None:
        return build_backbone(name, pretrained, output_stride)
    spec = checked_spec(ckpt.get("meta"), pretrained)
    found = spec["args"].get("backbone")
    if found is not None and found != name:
        raise CheckpointError(f"model.pretrained='{pretrained}' is a {describe(spec)} checkpoint on backbone {found}, "
                              f"but this network uses backbone {name}: give a checkpoint of a {name} network (e.g. "
                              f"the stage-0 final.pth trained with model.backbone={name}) or its ImageNet weights")
    model = ckpt.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"model.pretrained='{pretrained}' has no 'model' state dict; re-create it")
    state = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    if not state:
        raise CheckpointError(f"model.pretrained='{pretrained}' ({describe(spec)}) holds no backbone.* weights: "
                              f"give a checkpoint of a network with a backbone (e.g. the stage-0 final.pth)")
    backbone = build_backbone(name, "", output_stride)
    check_state_fits(backbone, state, pretrained, what=f"the backbone of model.pretrained ({describe(spec)})")
    backbone.load_state_dict(state, strict=True)
    print(f"loaded the {name} backbone ({len(state)} tensors) from the smaf checkpoint {pretrained} "
          f"({describe(spec)})", flush=True)
    return backbone


# ---------------------------------------------------------------------------------------- registry
MAX_SEG_STRIDE = 16   # 32 is too coarse for segmentation


def _checked_stride(backbone: str, output_stride: int) -> int:
    """``output_stride`` if the backbone has it (:func:`smaf.models.build_backbone` says which it has) and it is
    at most 16: 8 or 16, 14 for ``vit_s14_focus``."""
    if int(output_stride) > MAX_SEG_STRIDE:
        raise ValueError(f"segmentation network on {backbone}: output_stride must be at most {MAX_SEG_STRIDE} (8 or "
                         f"16; 14 for vit_s14_focus): {output_stride} is too coarse for segmentation")
    return int(output_stride)


@register_architecture("deeplab_v2")
def build_deeplab_v2(num_classes: int, backbone: str = "resnet38d", output_stride: int = 8, dilations=None,
                     class_names=None, pretrained: str = "") -> SegmentationNet:
    """DeepLab-v2 (ASPP, summed) on ``backbone`` with ``num_classes`` foreground classes (C+1 outputs).
    ``dilations`` (None = 6/12/18/24 scaled to ``output_stride``, :func:`scaled_dilations`); ``class_names``
    (C strings, kept in checkpoints for predictions); ``pretrained`` (not recorded, see the module docstring)."""
    stride = _checked_stride(backbone, output_stride)
    net = backbone_with_weights(backbone, pretrained, stride)
    rates = scaled_dilations(ASPP_DILATIONS, stride) if dilations is None else [int(d) for d in dilations]
    return SegmentationNet(net, ASPPHead(net.out_channels, int(num_classes) + 1, rates), num_classes, class_names)


@register_architecture("deeplab_largefov")
def build_deeplab_largefov(num_classes: int, backbone: str = "resnet38d", output_stride: int = 8,
                           dilation: int | None = None, width: int = LARGEFOV_WIDTH, class_names=None,
                           pretrained: str = "") -> SegmentationNet:
    """DeepLab-LargeFOV (v1) on ``backbone``: ``dilation`` (None = 12 scaled to ``output_stride``), ``width``
    (fc6/fc7 channels, 1024); other arguments as :func:`build_deeplab_v2`."""
    stride = _checked_stride(backbone, output_stride)
    net = backbone_with_weights(backbone, pretrained, stride)
    rate = scaled_dilations([LARGEFOV_DILATION], stride)[0] if dilation is None else int(dilation)
    head = LargeFOVHead(net.out_channels, int(num_classes) + 1, rate, int(width))
    return SegmentationNet(net, head, num_classes, class_names)


def seg_spec(arch: str, num_classes: int, backbone: str, output_stride: int, class_names=None,
             dilations=None) -> dict:
    """The architecture spec of a stage-4 network (what its checkpoints record): ``arch`` one of
    :data:`SEG_ARCHITECTURES`, the dilations resolved (``dilations`` None/empty = DeepLab's, scaled to the output
    stride) so that the file says what was trained. A bad name is a ValueError listing the valid ones."""
    if arch not in SEG_ARCHITECTURES:
        raise ValueError(f"unknown segmentation architecture '{arch}'; valid: {', '.join(SEG_ARCHITECTURES)}")
    args = {"num_classes": int(num_classes), "backbone": str(backbone), "output_stride": int(output_stride)}
    if arch == "deeplab_v2":
        args["dilations"] = ([int(d) for d in dilations] if dilations else scaled_dilations(ASPP_DILATIONS,
                                                                                            output_stride))
    else:
        if dilations and len(dilations) != 1:
            raise ValueError(f"deeplab_largefov has one dilation (fc6), got {list(dilations)}")
        args["dilation"] = (int(dilations[0]) if dilations else
                            scaled_dilations([LARGEFOV_DILATION], output_stride)[0])
    if class_names is not None:
        args["class_names"] = [str(n) for n in class_names]
    return {"arch": arch, "args": args}
