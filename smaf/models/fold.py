"""Inference copies of a network: every BatchNorm that directly follows a convolution folded into it, and on a
CPU the 1x1 convolutions run together with their activation as one oneDNN primitive.

In eval mode BN is an affine map per channel, so ``bn(conv(x))`` equals one convolution with weights
``w * g / sqrt(v + eps)`` and bias ``b - m * g / sqrt(v + eps)`` (same maps up to float rounding, ~1e-6
relative). Folding saves a full read and write of every activation: EfficientNet-Lite0 (50 pairs) runs
1.23x faster on CPU (2 x 3 x 240 x 320, output stride 8, one thread: 0.37 s -> 0.30 s). ResNet-38 is
pre-activation, but the BN in the middle of each block follows a conv directly: 19 pairs fold (+ the CAM
head's); on a CPU that is not measurable there (its 3x3 convs are nearly all of the time), on a GPU it
removes memory-bound passes.

On a CPU PyTorch sends a 1x1 convolution on one thread with a batch under 16 to its own im2col/GEMM kernel
(its heuristic: faster than oneDNN single-threaded), and the activation after it is another pass over the
output. On this project's AVX-512 CPU oneDNN is faster for every 1x1 conv of EfficientNet-Lite0, and it applies
ReLU/ReLU6 as a post-op while the output is in cache: :class:`OneDNNPointwiseConv` (one thread, scales 0.5-2 of
~250x320 images x flip: 1.97 s -> 1.76 s per image; the same maps within float rounding).

Modules declare their triples with a class attribute ``CONV_BN_ACT = (("conv_attr", "bn_attr", "act_attr" or
None), ...)`` (conv and BN may be None on an instance, e.g. a block without an expansion conv).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

# activation module type -> (oneDNN post-op name, its scalars)
_ONEDNN_ACTIVATIONS = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", [])}


def _declared(model: nn.Module):
    """Yield (module, conv attribute, bn attribute, activation attribute or None, conv, bn) for every triple the
    modules of ``model`` declare in ``CONV_BN_ACT`` (conv / bn None where the instance lacks them)."""
    for module in model.modules():
        for conv_name, bn_name, act_name in getattr(module, "CONV_BN_ACT", ()):
            yield (module, conv_name, bn_name, act_name, getattr(module, conv_name, None),
                   getattr(module, bn_name, None))


def foldable_triples(model: nn.Module) -> list[tuple[nn.Module, str, str, str | None]]:
    """(module, conv attribute, bn attribute, activation attribute or None) of every declared conv -> BN pair
    that is present."""
    return [(module, conv_name, bn_name, act_name)
            for module, conv_name, bn_name, act_name, conv, bn in _declared(model)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)]


def onednn_pointwise_available() -> bool:
    """Whether this torch build has oneDNN and its fused convolution op (used by torch.compile's CPU backend)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class OneDNNPointwiseConv(nn.Module):
    """A 1x1, stride-1, ungrouped convolution with bias, followed by an activation (ReLU6, ReLU or none), for
    CPU inference: one oneDNN primitive with the activation as a post-op.

    (B, C_in, H, W) float32 CPU -> (B, C_out, H, W) in the input's memory format. Anything else (autograd on,
    autocast, another dtype or device) runs the plain ``activation(conv2d(x))``, so the module stays a faithful
    stand-in for the pair it replaces.
    """

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None):
        super().__init__()
        if not is_pointwise(conv):
            raise ValueError(f"OneDNNPointwiseConv needs a 1x1, stride-1, ungrouped conv, got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.activation = activation if activation is not None else nn.Identity()
        self.post_op, self.post_op_scalars = (_ONEDNN_ACTIVATIONS[type(activation)] if activation is not None
                                              else ("none", []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != self.weight.dtype or torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return self.activation(F.conv2d(x, self.weight, self.bias))
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, [0, 0], [1, 1], [1, 1], 1,
                                                       self.post_op, self.post_op_scalars, "")


def is_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding in ((0, 0), 0))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode inference copy of ``model`` with its conv -> BN pairs folded; the model itself is
    untouched. Returns (model to use, number of folded pairs): ``model`` itself when nothing folds.

    The copy shares every parameter and buffer that folding does not replace (copying them would cost time
    and memory: ResNet-38 holds 420 MB of weights, most of them in convs without a BN after them); folded
    convs get new tensors. Use the copy under ``torch.no_grad()``: the shared parameters keep their ``requires_grad``."""
    if not foldable_triples(model):
        return model, 0
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    folded = copy.deepcopy(model, memo=shared).eval()
    triples = foldable_triples(folded)
    for module, conv_name, bn_name, _ in triples:
        # fuse_conv_bn_eval copies the conv and gives it new weight and bias tensors: the shared ones stay
        setattr(module, conv_name, fuse_conv_bn_eval(getattr(module, conv_name), getattr(module, bn_name)))
        getattr(module, conv_name).requires_grad_(False)
        setattr(module, bn_name, nn.Identity())
    return folded, len(triples)


def fuse_pointwise_activations(folded: nn.Module) -> int:
    """In place on an inference copy made by :func:`fold_batchnorm` (never on a training model): each declared
    1x1 conv (BN already folded) becomes a :class:`OneDNNPointwiseConv` that also applies its activation, whose
    module becomes an Identity. Returns the number of convs replaced (0 without oneDNN)."""
    if not onednn_pointwise_available():
        return 0
    count = 0
    for module, conv_name, _, act_name, conv, bn in list(_declared(folded)):   # (list: setattr below)
        act = getattr(module, act_name) if act_name else None
        if not (is_pointwise(conv) and isinstance(bn, nn.Identity)
                and (act is None or type(act) in _ONEDNN_ACTIVATIONS)):
            continue
        setattr(module, conv_name, OneDNNPointwiseConv(conv, act))
        if act_name:
            setattr(module, act_name, nn.Identity())
        count += 1
    return count


def inference_copy(model: nn.Module, device: torch.device) -> tuple[nn.Module, str]:
    """The model to run inference with (eval mode, no gradients) and a line saying what was changed: BN folded
    (:func:`fold_batchnorm`) and, on a CPU, the 1x1 convs fused with their activation
    (:func:`fuse_pointwise_activations`). The copy never changes ``model``; when nothing folds, ``model``
    itself is returned, switched to eval mode."""
    copy_, folded = fold_batchnorm(model)
    if not folded:
        return model.eval(), ""
    fused = fuse_pointwise_activations(copy_) if torch.device(device).type == "cpu" else 0
    note = f"inference copy of the model: {folded} conv+BN pairs folded"
    if fused:
        note += f", {fused} 1x1 convs fused with their activation (oneDNN)"
    return copy_, note
