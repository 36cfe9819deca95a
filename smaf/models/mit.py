"""Mix Transformer (MiT-B0 ... B5), the SegFormer encoder (Xie et al., NeurIPS 2021), in plain PyTorch, with
per-block attention logits (for AFA, related-methods.md §7) and a loader for the official ImageNet-1k
``mit_b*.pth`` files.

Four stages; stage s runs on the tokens of an overlapping patch embedding (conv k x k, stride t, padding k // 2,
then LayerNorm eps 1e-5): k = 7, 3, 3, 3 and t = 4, 2, 2, 2 (output stride 32). Each block (LayerNorm eps 1e-6,
pre-norm, stochastic depth linearly 0 -> ``drop_path_rate`` over all blocks)::

    x = x + Attention(norm1(x))     efficient self-attention: q = Linear(x); k, v = Linear(reduce(x)), where
                                    reduce = Conv R x R / stride R + LayerNorm(eps 1e-5) when R > 1 (keys N' = N/R^2)
    x = x + MixFFN(norm2(x))        Linear D -> 4D -> depthwise 3x3 conv (on the h x w map) -> GELU -> Linear 4D -> D

and each stage ends with a LayerNorm (eps 1e-6). Per stage: heads 1, 2, 5, 8; reduction R 8, 4, 2, 1; MLP ratio
4; q/k/v biases. Variants (:data:`MIT_VARIANTS`): widths 32/64/160/256 (B0) or 64/128/320/512 (B1-B5); depths
B0 2/2/2/2, B1 2/2/2/2, B2 3/4/6/3, B3 3/4/18/3, B4 3/8/27/3, B5 3/6/40/3.

Output stride (``output_stride``): 32 = the strides above; 16 = AFA's ``stride: [4, 2, 2, 1]`` (stage 4's patch
embedding at stride 1, so stage 4 is at stride 16); 8 = [4, 2, 1, 1] (stages 3 and 4 at stride 8). A stride-1
patch embedding keeps its pretrained 3x3 kernel (no dilation: that is how AFA does it). With an odd kernel and
padding k // 2, stage s's map is h_s = ceil(h_{s-1} / t_s): stage 1 is ceil(H / 4) x ceil(W / 4), and so on.

Weights (:func:`load_mit_weights`): the official files (NVlabs/SegFormer's ImageNet-1k ``mit_b0.pth`` ...
``mit_b5.pth``) hold exactly this module's keys plus the classifier ``head.weight`` / ``head.bias``, which is
dropped::

    patch_embed{1-4}.proj.{weight,bias}    patch_embed{1-4}.norm.{weight,bias}
    block{s}.{i}.norm1 / norm2 .{weight,bias}
    block{s}.{i}.attn.q / attn.kv / attn.proj .{weight,bias}
    block{s}.{i}.attn.sr / attn.norm .{weight,bias}            (stages with R > 1: 1-3)
    block{s}.{i}.mlp.fc1 / mlp.dwconv.dwconv / mlp.fc2 .{weight,bias}
    norm{1-4}.{weight,bias}

A nested (``{'state_dict': ...}``) or ``module.``-prefixed file is unwrapped; any other missing or unexpected key,
or a wrong shape, is a one-line error naming the file. No such file exists offline, so ``pretrained: imagenet``
is refused with the download hint.

Input: ImageNet-normalised RGB (AFA's mean 123.675/116.28/103.53, std 58.395/57.12/57.375 on 0-255 are the same).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend

NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
PATCH_SIZES = (7, 3, 3, 3)
BLOCK_NORM_EPS = 1e-6         # block and stage-end LayerNorms (SegFormer's norm_layer)
EMBED_NORM_EPS = 1e-5         # patch-embedding and spatial-reduction LayerNorms (nn.LayerNorm's default)
DROP_PATH_RATE = 0.1
#: Patch-embedding strides of the four stages, per output stride.
STAGE_STRIDES_FOR_OUTPUT_STRIDE = {32: (4, 2, 2, 2), 16: (4, 2, 2, 1), 8: (4, 2, 1, 1)}
HEAD_PREFIX = "head."         # the ImageNet classifier of the official files


@dataclass(frozen=True)
class MiTSpec:
    """Widths and depths of the four stages of one MiT variant."""

    dims: tuple
    depths: tuple


MIT_VARIANTS = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSpec((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": MiTSpec((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": MiTSpec((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": MiTSpec((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": MiTSpec((64, 128, 320, 512), (3, 6, 40, 3)),
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate`` (scaled by 1/keep)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class OverlapPatchEmbed(nn.Module):
    """Conv k x k / stride t (padding k // 2) + LayerNorm: (B, C_in, H, W) -> ((B, h*w, D), h, w)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Self-attention whose keys/values come from the map reduced R x R (module docstring).
    (B, N, D) on an h x w grid -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: {dim} dims do not split into {num_heads} heads")
        self.num_heads, self.head_dim, self.sr_ratio = num_heads, dim // num_heads, sr_ratio
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=EMBED_NORM_EPS)

    def forward(self, x: torch.Tensor, h: int, w: int, return_logits: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N = h*w, D) -> (out (B, N, D), logits): with ``return_logits`` the raw attention logits q k^T
        (B, heads, N, N'), N' = floor(h/R) * floor(w/R), before the 1/sqrt(head_dim) scaling and the softmax;
        else None (fused attention). A grid side below R (a small image or scale: SegFormer's reduction conv
        fails there) is zero-padded at the bottom/right up to R, giving one reduced row/column."""
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(b, d, h, w)
            r = self.sr_ratio
            if h < r or w < r:
                grid = F.pad(grid, (0, max(0, r - w), 0, max(0, r - h)))
            reduced = self.sr(grid).flatten(2).transpose(1, 2)
            kv_input = self.norm(reduced)
        else:
            kv_input = x
        k, v = self.kv(kv_input).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, logits = attend(q, k, v, self.scale, return_logits)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), logits


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 conv on tokens: (B, h*w, C) -> (B, h*w, C). (A module of its own for the official
    ``mlp.dwconv.dwconv`` key.)"""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear D -> hidden -> depthwise 3x3 -> GELU -> Linear hidden -> D. (B, h*w, D) -> (B, h*w, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class MiTBlock(nn.Module):
    """Pre-norm block: efficient self-attention + Mix-FFN, each with stochastic depth. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int = MLP_RATIO, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, x: torch.Tensor, h: int, w: int, return_logits: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, logits = self.attn(self.norm1(x), h, w, return_logits)
        x = x + drop_path(attended, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x), h, w), self.drop_path_rate, self.training)
        return x, logits


class MixVisionTransformer(nn.Module):
    """A MiT encoder (module docstring); attribute names are the official files' keys.

    Args:
        variant: a key of :data:`MIT_VARIANTS` (``mit_b0`` ... ``mit_b5``).
        output_stride: 32, 16 (AFA) or 8 (:data:`STAGE_STRIDES_FOR_OUTPUT_STRIDE`).
        drop_path_rate: the stochastic depth of the last block (0.1 in SegFormer and AFA).

    ``forward(x, return_attn=False)`` with x (B, 3, H, W) ImageNet-normalised RGB returns a dict:
    ``'stage1'`` ... ``'stage4'`` (B, dims[s], h_s, w_s), h_s = ceil(H / stage_strides[s]), w_s likewise; ``'conv6'`` = the
    stage-4 map (the CAM feature, at ``output_stride``); with ``return_attn``: ``'attn_logits'``, per stage a
    list of per-block raw logits q k^T (B, heads_s, N_s, N'_s), before scaling and softmax, N_s = h_s * w_s and
    N'_s = N_s / R_s^2 (``attn_logits[3]`` = the stage-4 blocks AFA turns into affinity).

    Attributes: ``dims``, ``depths``, ``num_heads``, ``stage_strides`` (cumulative stride of each stage),
    ``output_stride``, ``out_channels`` (= dims[3]).
    """

    def __init__(self, variant: str = "mit_b1", output_stride: int = 32, drop_path_rate: float = DROP_PATH_RATE):
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant '{variant}'; valid: {', '.join(MIT_VARIANTS)}")
        if int(output_stride) not in STAGE_STRIDES_FOR_OUTPUT_STRIDE:
            raise ValueError(f"backbone {variant}: model.output_stride must be one of "
                             f"{', '.join(map(str, sorted(STAGE_STRIDES_FOR_OUTPUT_STRIDE)))}, got {output_stride}")
        spec = MIT_VARIANTS[variant]
        self.variant, self.dims, self.depths, self.num_heads = variant, spec.dims, spec.depths, NUM_HEADS
        strides = STAGE_STRIDES_FOR_OUTPUT_STRIDE[int(output_stride)]
        self.stage_strides = tuple(math.prod(strides[:s + 1]) for s in range(4))
        self.output_stride = int(output_stride)
        self.out_channels = spec.dims[-1]
        total = sum(spec.depths)
        rates = [float(drop_path_rate) * i / max(total - 1, 1) for i in range(total)]   # 0 -> rate, linearly
        in_channels, first = 3, 0
        for s in range(4):
            dim = spec.dims[s]
            setattr(self, f"patch_embed{s + 1}", OverlapPatchEmbed(in_channels, dim, PATCH_SIZES[s], strides[s]))
            setattr(self, f"block{s + 1}", nn.ModuleList(
                MiTBlock(dim, NUM_HEADS[s], SR_RATIOS[s], MLP_RATIO, rates[first + i]) for i in range(spec.depths[s])))
            setattr(self, f"norm{s + 1}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            in_channels, first = dim, first + spec.depths[s]
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> dict:
        features, logits = {}, []
        for s in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{s}")(x)
            stage_logits = []
            for block in getattr(self, f"block{s}"):
                tokens, block_logits = block(tokens, h, w, return_attn)
                stage_logits.append(block_logits)
            tokens = getattr(self, f"norm{s}")(tokens)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            features[f"stage{s}"] = x
            logits.append(stage_logits)
        features["conv6"] = x
        if return_attn:
            features["attn_logits"] = logits
        return features


def _init_weights(module: nn.Module) -> None:
    # SegFormer's initialisation (for random init): truncated normal linears, fan-out normal convs.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        nn.init.zeros_(module.bias)


def load_mit_weights(model: MixVisionTransformer, path: str | os.PathLike) -> None:
    """Load an official ImageNet ``mit_b*.pth`` (module docstring) into ``model``: ``head.*`` dropped, every
    other key must be one of the model's and every model tensor filled with the right shape, else a one-line
    :class:`~smaf.models.weights.WeightsError` naming the file."""
    from smaf.models.weights import load_exact_state, read_state_dict

    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(HEAD_PREFIX)}
    load_exact_state(model, state, Path(path), what=f"{model.variant} weights")


def build_mit(variant: str, pretrained: str | os.PathLike = "", output_stride: int = 32,
              drop_path_rate: float = DROP_PATH_RATE) -> MixVisionTransformer:
    """MiT ``variant`` at ``output_stride`` with weights ``pretrained``: '' = random init, a path = an official
    ``mit_b*.pth`` (:func:`load_mit_weights`)."""
    model = MixVisionTransformer(variant, output_stride, drop_path_rate)
    if pretrained:
        load_mit_weights(model, pretrained)
    return model
