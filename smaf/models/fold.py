"""Inference copies of a network with every BatchNorm that directly follows a convolution folded into it.

In eval mode BN is an affine map per channel, so ``bn(conv(x))`` equals one convolution with weights
``w * g / sqrt(v + eps)`` and bias ``b - m * g / sqrt(v + eps)`` (same maps up to float rounding, ~1e-6
relative). Folding saves a full read and write of every activation: EfficientNet-Lite0 (50 pairs) runs
1.23x faster on CPU (2 x 3 x 240 x 320, output stride 8, one thread: 0.37 s -> 0.30 s). ResNet-38 puts BN
before its convolutions (pre-activation), so nothing folds there.

Modules declare the pairs with a class attribute ``CONV_BN_PAIRS = (("conv_attr", "bn_attr"), ...)``
(either may be None on an instance, e.g. a block without an expansion conv).
"""
from __future__ import annotations

import copy

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, conv attribute, bn attribute) of every declared conv -> BN pair that is present."""
    pairs = []
    for module in model.modules():
        for conv_name, bn_name in getattr(module, "CONV_BN_PAIRS", ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                pairs.append((module, conv_name, bn_name))
    return pairs


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode inference copy of ``model`` with its conv -> BN pairs folded; the model itself is
    untouched. Returns (model to use, number of folded pairs): ``model`` itself when nothing folds."""
    if not foldable_pairs(model):
        return model, 0
    folded = copy.deepcopy(model).eval()
    pairs = foldable_pairs(folded)
    for module, conv_name, bn_name in pairs:
        setattr(module, conv_name, fuse_conv_bn_eval(getattr(module, conv_name), getattr(module, bn_name)))
        setattr(module, bn_name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded, len(pairs)
