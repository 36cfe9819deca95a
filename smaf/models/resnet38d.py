"""ResNet-38 ("resnet38d", Wu et al. model A1) as used by the PSA lineage (PSA, SEAM, EPS, SMAF).

Layout (pre-activation residual blocks; sizes for a 448x448 input)::

    conv1a  3x3 3->64                                    448x448
    b2, b2_1, b2_2          128      first stride 2      224x224   (output stride 2)
    b3, b3_1, b3_2          256      first stride 2      112x112   (4)
    b4, b4_1 .. b4_5        512      first stride 2       56x56    (8)   <- 'conv4' = BN-ReLU input of b5
    b5, b5_1, b5_2   mid 512, out 1024, dilation 2        56x56          <- 'conv5' = BN-ReLU input of b6
    b6   bottleneck 1024 -> (512, 1024) -> 2048, dilation 4, Dropout2d 0.3
    b7   bottleneck 2048 -> (1024, 2048) -> 4096, dilation 4, Dropout2d 0.5
    bn7 + ReLU                                            56x56   <- 'conv6' (4096 channels)

A stride-2 3x3 convolution with padding 1 gives ceil(H / 2), so an H x W input gives features of
ceil(ceil(ceil(H/2)/2)/2) = ceil(H/8) (321x500 -> 41x63).

Module and parameter names follow the reference (``b4_3.bn_branch2b1.weight`` ...), which is what the MXNet key
mapping of :mod:`smaf.models.convert` produces and what PSA/SEAM/EPS/SMAF checkpoints contain. Total parameters
(BN affine included, BN buffers not): 105,070,912.

BatchNorm: eps 1e-5 (the MXNet model's: ademxapp's ``bn()`` symbol wrapper defaults to ``eps=1e-5``, which is also
PyTorch's default). Every BN stays in eval mode with frozen affine parameters even after ``.train()``, and conv1a
and b2* are frozen, as in the reference: the batch size never affects the features.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-5
# Frozen whatever the training stage: the stem and the first stage (as the reference does).
FROZEN_MODULES = ("conv1a", "b2", "b2_1", "b2_2")


class ResBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU -> 3x3 conv (stride, first_dilation) -> BN-ReLU -> 3x3 conv (dilation).

    The shortcut is the identity when the shape is unchanged, else a 1x1 projection ``conv_branch1`` (with the
    block's stride) applied to the BN-ReLU output. Input (B, in, H, W) -> output (B, out, ceil(H/s), ceil(W/s)).
    """

    # the BN in the middle directly follows a conv, so inference copies fold it (smaf.models.fold); the input BN
    # acts on the sum of the previous block's branches and cannot be folded
    CONV_BN_ACT = (("conv_branch2a", "bn_branch2b1", "relu_2b1"),)

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1):
        super().__init__()
        if first_dilation is None:
            first_dilation = dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels, eps=BN_EPS)
        # In place is safe: the BN output is a fresh tensor nothing else refers to.
        self.relu_2b1 = nn.ReLU(inplace=True)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_input_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in, H, W) -> (block output (B, out, H', W'), BN-ReLU of x (B, in, H, W))."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(x_bn_relu)
        branch = self.relu_2b1(self.bn_branch2b1(self.conv_branch2a(x_bn_relu)))
        branch = self.conv_branch2b1(branch)
        return shortcut + branch, x_bn_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input_activation(x)[0]


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck (b6, b7): BN-ReLU -> 1x1 (out/4) -> BN-ReLU -> Dropout2d -> 3x3 dilated (out/2)
    -> BN-ReLU -> Dropout2d -> 1x1 (out); 1x1 projection shortcut ``conv_branch1`` on the BN-ReLU input when the
    shape changes. Input (B, in, H, W) -> (B, out, H, W) (stride 1)."""

    CONV_BN_ACT = (("conv_branch2a", "bn_branch2b1", "relu_2b1"), ("conv_branch2b1", "bn_branch2b2", "relu_2b2"))

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4, eps=BN_EPS)
        self.relu_2b1 = nn.ReLU(inplace=True)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2, eps=BN_EPS)
        self.relu_2b2 = nn.ReLU(inplace=True)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_input_activation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in, H, W) -> (block output (B, out, H, W), BN-ReLU of x (B, in, H, W))."""
        x_bn_relu = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(x_bn_relu)
        branch = self.conv_branch2a(x_bn_relu)
        branch = self.dropout_2b1(self.relu_2b1(self.bn_branch2b1(branch)))
        branch = self.conv_branch2b1(branch)
        branch = self.dropout_2b2(self.relu_2b2(self.bn_branch2b2(branch)))
        branch = self.conv_branch2b2(branch)
        return shortcut + branch, x_bn_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input_activation(x)[0]


class ResNet38d(nn.Module):
    """ResNet-38 backbone, output stride 8.

    ``forward(x)`` with x (B, 3, H, W) ImageNet-normalised RGB returns a dict of features, all at
    (h, w) = (ceil(H/8), ceil(W/8)) except conv3:

    * ``'conv3'`` (B, 256, ceil(H/4), ceil(W/4)): BN-ReLU input of b4 (exposed by SEAM's copy);
    * ``'conv4'`` (B, 512, h, w): BN-ReLU input of b5;
    * ``'conv5'`` (B, 1024, h, w): BN-ReLU input of b6;
    * ``'conv6'`` (B, 4096, h, w): ReLU(bn7(b7 output)), the feature every head uses.

    Attributes: ``out_channels`` = 4096 (channels of 'conv6'), ``feature_channels`` (channels of each key).
    """

    out_channels = 4096
    feature_channels = {"conv3": 256, "conv4": 512, "conv5": 1024, "conv6": 4096}

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)

        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)

        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)

        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)

        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)

        self.b6 = BottleneckBlock(1024, 2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096, eps=BN_EPS)

        self._freeze()

    def _freeze(self) -> None:
        """BN to eval mode with frozen affine parameters; conv1a and b2* frozen entirely."""
        for name in FROZEN_MODULES:
            for param in getattr(self, name).parameters():
                param.requires_grad_(False)
        for layer in self.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.eval()
                layer.weight.requires_grad_(False)
                layer.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet38d":
        """Switch dropout on/off as usual; BatchNorm stays in eval mode and the frozen layers stay frozen."""
        super().train(mode)
        self._freeze()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2):
            x = block(x)
        x, conv3 = self.b4.forward_with_input_activation(x)
        for block in (self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x = block(x)
        x, conv4 = self.b5.forward_with_input_activation(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_input_activation(x)
        x = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return {"conv3": conv3, "conv4": conv4, "conv5": conv5, "conv6": conv6}
