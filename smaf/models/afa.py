"""AFA, Affinity from Attention (Ru et al., CVPR 2022; related-methods.md §7): a single-stage network that learns
a classifier, a semantic affinity and a segmentation decoder together, on a transformer encoder.

Architecture ``afa`` (:func:`build_afa`), on any backbone that exposes attention logits (``mit_b0`` ... ``mit_b5``,
``vit_s14_focus``; docs/backbones.md)::

    encoder        x (B, 3, H, W) -> stage maps; f = the last stage's map (B, D, h, w)
    classifier     1x1 conv D -> C, no bias. cls logits = classifier(global max pool of f) (B, C); the CAM =
                   classifier(f) (B, C, h, w), the same weights on every position
    affinity       the raw logits q k^T of the last stage's blocks (MiT-B1: its 2 stage-4 blocks x 8 heads = 16
                   maps of N x N, N = h w), A + A^T, 1x1 conv (maps -> 1), sigmoid: (B, N, N), symmetric
    decoder        SegFormer's all-MLP head: each stage map -> 256 channels (a per-token linear = 1x1 conv),
                   upsampled bilinearly to the first map's size, concatenated, 1x1 conv + BatchNorm + ReLU,
                   Dropout 0.1, 1x1 conv -> C + 1 logits (background first, VOC numbering)

On a ViT (one stage of 12 blocks) the last stage is all of its blocks (``attention_blocks`` picks the last k);
the cls token's row and column are dropped, and the decoder has the one token map ('conv6', stride 14).

``forward(x)`` returns the segmentation logits (B, C + 1, h_1, w_1) at the first map's stride (MiT: 4), the
interface of a stage-4 segmentation network, so stage-4 inference and validation run it unchanged;
``forward(x, train_outputs=True)`` returns :class:`AFAOutputs` (what a training step needs; called through the
DDP wrapper so that gradients are synchronised).

The encoder's LayerNorms are frozen (AFA trains its norm layers at lr 0); ``param_groups()`` lists [encoder
weights, encoder biases, new weights, new biases] (classifier, affinity projection and decoder are new: AdamW at
10 x lr, :func:`smaf.optim.build_adamw`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_architecture

DECODER_DIM = 256              # SegFormer's MLP-head width (AFA's config)
DECODER_DROPOUT = 0.1
AFA_OUTPUT_STRIDE = 16          # MiT at strides [4, 2, 2, 1]
AFA_ARCHITECTURES = ("afa",)


@dataclass
class AFAOutputs:
    """What one training forward pass of :class:`AFANet` computes.

    Attributes:
        cls_logits: (B, C) global-max-pooled class logits.
        cam: (B, C, h, w) the classifier applied to the last stage's map (before any ReLU).
        seg_logits: (B, C + 1, h_1, w_1) decoder logits at the first decoder input's resolution.
        affinity: (B, N, N) sigmoid affinity between the N = h w positions of the last stage (row-major), or
            None when not asked for.
        grid: (h, w) of the last stage.
    """

    cls_logits: torch.Tensor
    cam: torch.Tensor
    seg_logits: torch.Tensor
    affinity: torch.Tensor | None
    grid: tuple


class MLPDecoder(nn.Module):
    """SegFormer's all-MLP decoder: maps list[(B, C_i, h_i, w_i)] -> logits (B, K, h_0, w_0)."""

    def __init__(self, in_channels, num_outputs: int, dim: int = DECODER_DIM, dropout: float = DECODER_DROPOUT):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Conv2d(int(c), dim, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(dim * len(self.embeds), dim, 1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_outputs, 1)

    def forward(self, maps: list) -> torch.Tensor:
        if len(maps) != len(self.embeds):
            raise ValueError(f"MLP decoder: {len(maps)} maps for {len(self.embeds)} inputs")
        size = maps[0].shape[-2:]
        embedded = []
        for embed, x in zip(self.embeds, maps):
            y = embed(x)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            embedded.append(y)
        return self.classifier(self.dropout(self.fuse(torch.cat(embedded, dim=1))))


class AttentionAffinity(nn.Module):
    """Affinity from attention: logits (B, M, N, N) -> sigmoid(conv1x1(A + A^T)) (B, N, N), symmetric."""

    def __init__(self, num_maps: int):
        super().__init__()
        self.proj = nn.Conv2d(int(num_maps), 1, 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(logits + logits.transpose(-2, -1))[:, 0])


def last_stage_attention(backbone: nn.Module) -> tuple[int, int, int]:
    """(heads, blocks of the last stage, leading non-patch tokens) of a backbone with attention logits; any
    other backbone is a ValueError."""
    from .mit import MixVisionTransformer
    from .vit import VisionTransformer

    if isinstance(backbone, MixVisionTransformer):
        return int(backbone.num_heads[-1]), int(backbone.depths[-1]), 0
    if isinstance(backbone, VisionTransformer):
        return int(backbone.num_heads), len(backbone.blocks), 1
    raise ValueError(f"AFA needs a transformer backbone with attention logits (mit_b0..mit_b5, vit_s14_focus), "
                     f"got {type(backbone).__name__}")


class AFANet(nn.Module):
    """The AFA network (module docstring).

    Args:
        backbone: a MiT or ViT encoder (``forward(x, return_attn)`` with ``'attn_logits'``).
        num_classes: C foreground classes.
        class_names: C names kept in checkpoints, or None.
        attention_blocks: how many of the last stage's blocks feed the affinity (0 = all: MiT-B1's 2).
        decoder_dim: width of the MLP decoder (256).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, class_names=None, attention_blocks: int = 0,
                 decoder_dim: int = DECODER_DIM):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"AFA: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != int(num_classes):
            raise ValueError(f"AFA: {len(class_names)} class names for {num_classes} classes")
        heads, depth, self.prefix_tokens = last_stage_attention(backbone)
        blocks = int(attention_blocks) or depth
        if not 1 <= blocks <= depth:
            raise ValueError(f"AFA: attention_blocks={attention_blocks} but the last stage has {depth} blocks")
        self.attention_blocks = blocks
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.decoder_keys = ([f"stage{s}" for s in range(1, 5)] if hasattr(backbone, "dims") else ["conv6"])
        in_channels = list(backbone.dims) if hasattr(backbone, "dims") else [backbone.out_channels]
        self.classifier = nn.Conv2d(backbone.out_channels, self.num_classes, 1, bias=False)
        self.affinity_head = AttentionAffinity(heads * blocks)
        self.decoder = MLPDecoder(in_channels, self.num_outputs, int(decoder_dim))
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(False)

    @property
    def num_outputs(self) -> int:
        """K = C + 1 (background first)."""
        return self.num_classes + 1

    def forward(self, x: torch.Tensor, train_outputs: bool = False, with_affinity: bool = True):
        """x (B, 3, H, W) ImageNet-normalised -> segmentation logits (B, C + 1, h_1, w_1); with
        ``train_outputs`` an :class:`AFAOutputs` (``with_affinity`` False skips the attention logits)."""
        need_attn = train_outputs and with_affinity
        features = self.backbone(x, return_attn=need_attn)
        seg = self.decoder([features[k] for k in self.decoder_keys])
        if not train_outputs:
            return seg.contiguous()
        f = features["conv6"]
        cls_logits = self.classifier(F.adaptive_max_pool2d(f, 1)).flatten(1)
        affinity = self._affinity(features) if need_attn else None
        return AFAOutputs(cls_logits, self.classifier(f), seg, affinity, tuple(f.shape[-2:]))

    def cam_and_affinity(self, x: torch.Tensor, with_affinity: bool = False):
        """The encoder and classifier only (no decoder): x (B, 3, H, W) -> (CAM (B, C, h, w) before ReLU,
        affinity (B, N, N) or None)."""
        features = self.backbone(x, return_attn=with_affinity)
        return self.classifier(features["conv6"]), self._affinity(features) if with_affinity else None

    def _affinity(self, features: dict) -> torch.Tensor:
        f = features["conv6"]
        n = f.shape[-2] * f.shape[-1]
        logits = torch.cat(features["attn_logits"][-1][-self.attention_blocks:], dim=1)
        p = self.prefix_tokens
        affinity = self.affinity_head(logits[..., p:, p:].float())
        if affinity.shape[-1] != n:
            raise ValueError(f"AFA: attention over {affinity.shape[-1]} tokens but the map has {n} positions")
        return affinity

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[encoder weights, encoder biases, new weights, new biases], trainable parameters only (the
        encoder's frozen LayerNorms are in none)."""
        encoder = {id(p) for p in self.backbone.parameters()}
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups[2 * (id(param) not in encoder) + name.endswith("bias")].append(param)
        return groups


@register_architecture("afa")
def build_afa(num_classes: int, backbone: str = "mit_b1", output_stride: int = AFA_OUTPUT_STRIDE,
              attention_blocks: int = 0, decoder_dim: int = DECODER_DIM, class_names=None,
              pretrained: str = "") -> AFANet:
    """AFA on ``backbone`` at ``output_stride`` (MiT: 16 = AFA's strides [4, 2, 2, 1]; ViT: 14) with
    ``num_classes`` foreground classes. ``pretrained`` (not recorded): '' random init, an ImageNet weights file
    of the backbone, ``imagenet`` (vit_s14_focus), or a smaf checkpoint on the same backbone (its
    ``backbone.*``; :func:`smaf.models.deeplab.backbone_with_weights`)."""
    from .deeplab import backbone_with_weights

    net = backbone_with_weights(backbone, pretrained, int(output_stride))
    return AFANet(net, num_classes, class_names, attention_blocks, decoder_dim)


def afa_spec(num_classes: int, backbone: str, output_stride: int, attention_blocks: int = 0,
             decoder_dim: int = DECODER_DIM, class_names=None) -> dict:
    """The architecture spec AFA's checkpoints record."""
    args = {"num_classes": int(num_classes), "backbone": str(backbone), "output_stride": int(output_stride),
            "attention_blocks": int(attention_blocks), "decoder_dim": int(decoder_dim)}
    if class_names is not None:
        args["class_names"] = [str(n) for n in class_names]
    return {"arch": "afa", "args": args}
