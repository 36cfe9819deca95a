"""The CAM network shared by every stage: a backbone + the SMAF head.

head "smaf" (EPS layout, background LAST)::

    backbone conv6 (B, D, h, w) -> 1x1 conv D->feat_dim (no bias) -> BatchNorm2d -> ReLU = f (B, feat_dim, h, w)
                                -> 1x1 conv feat_dim->C+1 (no bias)             = cam (B, C+1, h, w)
    logits = global average pool of cam (B, C+1)

channels 0..C-1 are the foreground classes, channel C the background. head "cls" is the same with C outputs
(a plain CAM classifier, no background channel); :meth:`CAMNet.add_background_channel` turns it into "smaf".

Auxiliary heads, trained by some stage-0 methods (:mod:`smaf.methods`) and recorded in the architecture spec, so
a checkpoint rebuilds them; ``forward(x)`` never runs them, ``forward(x, aux=True)`` returns their outputs too:

* ``pcm``: SEAM's pixel correlation module (:mod:`smaf.models.pcm`) on two intermediate backbone levels;
* ``projection_dim`` P > 0: PPC's projection 1x1 conv D -> P + ReLU on the backbone's conv6;
* ``subcategories`` K > 0: SC-CAM's sub-category classifier, a 1x1 conv feat_dim -> C*K (no bias) on f.

Every BatchNorm of the network, the head's included, stays in eval mode with frozen affine parameters even after
``.train()`` (as the reference's ``train()`` override does): batch statistics of 8 crops never leak into the
features, and data-parallel training gives the same result as one process. The head's BN therefore keeps its
initial state (running mean 0, var 1, weight 1, bias 0): a fixed per-channel scale of 1/sqrt(1 + eps).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .pcm import PixelCorrelationModule, pcm_input
from .registry import register_architecture

HEAD_TYPES = ("smaf", "cls")
_BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every BatchNorm in ``module`` in eval mode (running statistics used, never updated) and stop the
    gradient of its affine parameters. Returns ``module``."""
    for layer in module.modules():
        if isinstance(layer, _BATCHNORM_TYPES):
            layer.eval()
            for param in layer.parameters(recurse=False):
                param.requires_grad_(False)
    return module


class CAMNet(nn.Module):
    """Backbone + CAM head.

    Args:
        backbone: a module whose ``forward(x)`` returns a dict with ``'conv6'`` (B, D, h, w) and which has an
            ``out_channels`` attribute (= D), e.g. ResNet38d (D 4096, stride 8) or EfficientNetLite0 (D 1280).
        num_classes: C, the number of foreground classes.
        head: "smaf" (C+1 outputs, background last) or "cls" (C outputs).
        feat_dim: channels of the feature f (128 in SMAF).
        pcm_levels: ((key, channels), (key, channels)) of the two backbone levels SEAM's PCM reads; None = no PCM.
        projection_dim: channels of PPC's projection head (0 = none).
        subcategories: K sub-categories per class of SC-CAM's head (0 = none).

    Attributes: ``num_classes`` (C), ``has_background`` (bool), ``num_outputs`` (K = C+1 or C), ``feat_dim``;
    ``pcm``, ``projection``, ``subcategory_classifier`` (each None when absent).
    """

    CONV_BN_ACT = (("feature_conv", "feature_bn", "feature_relu"),)   # for smaf.models.fold

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "smaf", feat_dim: int = 128,
                 bg_bias: bool = False, logit_scale: float = 1.0,
                 pcm_levels: tuple[tuple[str, int], tuple[str, int]] | None = None, projection_dim: int = 0,
                 subcategories: int = 0):
        super().__init__()
        if head not in HEAD_TYPES:
            raise ValueError(f"CAMNet: head must be one of {', '.join(HEAD_TYPES)}, got '{head}'")
        if num_classes < 1:
            raise ValueError(f"CAMNet: num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.has_background = head == "smaf"
        self.feat_dim = feat_dim
        self.feature_conv = nn.Conv2d(backbone.out_channels, feat_dim, 1, bias=False)
        self.feature_bn = nn.BatchNorm2d(feat_dim)
        self.feature_relu = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(feat_dim, self.num_outputs, 1, bias=False)
        nn.init.xavier_uniform_(self.feature_conv.weight)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.logit_scale = float(logit_scale)   # a fixed temperature of the CAM logits (see calibrate_logit_scale)
        self.register_parameter("bg_bias", None)
        if bg_bias:
            self.add_background_bias(0.0)
        self.pcm_level_keys = tuple(key for key, _ in pcm_levels) if pcm_levels else ()
        self.pcm = PixelCorrelationModule(tuple(c for _, c in pcm_levels)) if pcm_levels else None
        self.projection = None
        if projection_dim:
            self.projection = nn.Conv2d(backbone.out_channels, int(projection_dim), 1, bias=False)
            nn.init.xavier_uniform_(self.projection.weight)
        self.subcategories = int(subcategories)
        self.subcategory_classifier = None
        if subcategories:
            self.subcategory_classifier = nn.Conv2d(feat_dim, num_classes * self.subcategories, 1, bias=False)
            nn.init.xavier_uniform_(self.subcategory_classifier.weight)
        freeze_batchnorm(self)

    @property
    def num_outputs(self) -> int:
        """K: CAM channels (C+1 with the background channel, else C)."""
        return self.num_classes + 1 if self.has_background else self.num_classes

    def head_modules(self) -> list[nn.Module]:
        """The newly initialised layers (trained with the 10x / 20x learning rates)."""
        aux = [m for m in (self.pcm, self.projection, self.subcategory_classifier) if m is not None]
        return [self.feature_conv, self.feature_bn, self.classifier] + aux

    def _head_params(self) -> set[int]:
        ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        if self.bg_bias is not None:
            ids.add(id(self.bg_bias))
        return ids

    def forward(self, x: torch.Tensor, aux: bool = False):
        """x (B, 3, H, W) ImageNet-normalised RGB -> (logits (B, K), cam (B, K, h, w), f (B, feat_dim, h, w)),
        with (h, w) = the backbone's feature size (H/8 for ResNet-38) and logits = mean of cam over h, w.

        With ``aux=True`` a 4th element, a dict: ``'backbone'`` (the backbone's feature dict, e.g. 'conv4',
        'conv5', 'conv6') and the outputs of the auxiliary heads the network has: ``'cam_rv'`` (B, C+1, h, w),
        the PCM-refined :func:`~smaf.models.pcm.pcm_input` of cam (background last); ``'projection'``
        (B, P, h, w); ``'subcategory_logits'`` (B, C*K), the spatial mean of the sub-category CAM."""
        levels = self.backbone(x)
        features = levels["conv6"]
        f = self.feature_relu(self.feature_bn(self.feature_conv(features)))
        cam = self.classifier(f)
        if self.logit_scale != 1.0:
            cam = cam * self.logit_scale
        if self.bg_bias is not None:   # a learned constant on the background logit (stage 2, see add_background_bias)
            cam = torch.cat([cam[:, :-1], cam[:, -1:] + self.bg_bias.to(cam.dtype)], 1)
        logits = cam.mean(dim=(2, 3))
        # A backbone may run channels-last (EfficientNet on CPU); callers get ordinary contiguous maps (cheap:
        # feat_dim and K channels), so .view() works on them.
        if not aux:
            return logits, cam.contiguous(), f.contiguous()
        return logits, cam.contiguous(), f.contiguous(), self._aux_outputs(x, levels, cam, f)

    def _aux_outputs(self, x: torch.Tensor, levels: dict, cam: torch.Tensor, f: torch.Tensor) -> dict:
        out = {"backbone": levels}
        if self.pcm is not None:
            out["cam_rv"] = self.pcm(pcm_input(cam, self.has_background), x,
                                     [levels[key] for key in self.pcm_level_keys])
        if self.projection is not None:
            out["projection"] = F.relu(self.projection(levels["conv6"])).contiguous()
        if self.subcategory_classifier is not None:
            out["subcategory_logits"] = self.subcategory_classifier(f).mean(dim=(2, 3))
        return out

    def forward_cam(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the raw cam (B, K, h, w), the same tensor as ``forward(x)[1]``."""
        return self.forward(x)[1]

    def train(self, mode: bool = True) -> "CAMNet":
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[pretrained weights, pretrained biases, new weights, new biases] for the poly SGD (lr x1, x2, x10,
        x20). "pretrained" = the backbone (whether or not it was initialised from ImageNet), "new" = the head.
        Only parameters with ``requires_grad`` are listed: frozen BN and stem convs are in no group."""
        head_param_ids = self._head_params()
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_new = id(param) in head_param_ids
            is_bias = name.endswith("bias")   # (bg_bias too: a bias, no weight decay, x20 lr)
            groups[2 * is_new + is_bias].append(param)
        return groups

    @torch.no_grad()
    def add_background_channel(self) -> None:
        """Turn a "cls" head (C outputs) into the "smaf" head (C+1) in place, for self-training from a plain CAM
        classifier: the C trained class rows are kept, the new background row (channel C, last) is freshly
        initialised with xavier-uniform as if the (C+1)-row layer were new. The classifier weight becomes a new
        Parameter: build the optimiser after calling this."""
        if self.has_background:
            raise ValueError("CAMNet.add_background_channel: the head already has a background channel")
        old = self.classifier
        new = nn.Conv2d(self.feat_dim, self.num_classes + 1, 1, bias=False).to(old.weight.device, old.weight.dtype)
        nn.init.xavier_uniform_(new.weight)
        new.weight[: self.num_classes] = old.weight
        new.weight.requires_grad_(old.weight.requires_grad)
        self.classifier = new
        self.has_background = True
        spec = getattr(self, "arch_spec", None)
        if spec is not None:   # checkpoints of the converted model rebuild the C+1 head
            self.arch_spec = {"arch": spec["arch"], "args": dict(spec["args"], head="smaf")}


    def set_logit_scale(self, scale: float) -> None:
        """Multiply the CAM logits by a fixed ``scale`` (recorded in the architecture spec). Dividing the logits of
        a plain CAM classifier (tens at its objects) this way, rather than its classifier weights, keeps the size
        of the weights' updates relative to the weights: a weight divided by D moves D times further, relative to
        its size, for the same gradient (the head then jumps off within a few steps)."""
        self.logit_scale = float(scale)
        spec = getattr(self, "arch_spec", None)
        if spec is not None:
            self.arch_spec = {"arch": spec["arch"], "args": dict(spec["args"], logit_scale=float(scale))}

    @torch.no_grad()
    def add_background_bias(self, value: float) -> None:
        """Give the background logit (channel C, last) a learned constant ``value`` (a new Parameter: build the
        optimiser after calling this). A background row without a bias cannot represent a constant background
        score: its features are non-negative (after the ReLU), so its logit grows with feature magnitude, largest
        on the object. Needs the C+1 head; on an existing bias only sets its value."""
        if not self.has_background:
            raise ValueError("CAMNet.add_background_bias: the head has no background channel (add_background_channel)")
        if self.bg_bias is None:
            self.bg_bias = nn.Parameter(torch.zeros((), device=self.classifier.weight.device))
        self.bg_bias.fill_(float(value))
        spec = getattr(self, "arch_spec", None)
        if spec is not None:
            self.arch_spec = {"arch": spec["arch"], "args": dict(spec["args"], bg_bias=True)}


@register_architecture("cam_net")
def build_cam_net(num_classes: int, backbone: str, output_stride: int = 8, feat_dim: int = 128, head: str = "smaf",
                  pretrained: str = "", bg_bias: bool = False, logit_scale: float = 1.0, pcm: bool = False,
                  projection_dim: int = 0, subcategories: int = 0) -> CAMNet:
    """The CAM network: backbone ``backbone`` (a name of :data:`smaf.models.BACKBONES`) + the SMAF head with
    ``num_classes`` foreground classes, and the auxiliary heads asked for (``pcm``, ``projection_dim``,
    ``subcategories``: see :class:`CAMNet`). ``pretrained`` ('' = random init, a file, or 'imagenet') is not
    recorded in the architecture's arguments."""
    from . import build_backbone
    from .affinity import BACKBONE_LEVELS

    pcm_levels = None
    if pcm:
        if backbone not in BACKBONE_LEVELS:
            raise ValueError(f"backbone {backbone} has no intermediate levels for SEAM's PCM; use one of "
                             f"{', '.join(sorted(BACKBONE_LEVELS))}")
        pcm_levels = tuple(BACKBONE_LEVELS[backbone][:2])
    return CAMNet(build_backbone(backbone, pretrained, output_stride), num_classes, head=head, feat_dim=feat_dim,
                  bg_bias=bg_bias, logit_scale=logit_scale, pcm_levels=pcm_levels, projection_dim=projection_dim,
                  subcategories=subcategories)
