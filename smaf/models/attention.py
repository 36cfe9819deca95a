"""Multi-head attention shared by the transformer backbones (:mod:`.vit`, :mod:`.mit`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of q (B, heads, N, d) over k, v (B, heads, N', d).

    Returns ``(out (B, heads, N, d), logits)``: with ``return_logits`` the raw logits q k^T (B, heads, N, N'),
    before the ``scale`` and the softmax (what AFA turns into affinity), computed explicitly; else None and
    PyTorch's fused kernel (``scale`` must then be 1/sqrt(d), its default)."""
    if return_logits:
        logits = q @ k.transpose(-2, -1)
        return torch.softmax(logits * scale, dim=-1) @ v, logits
    return F.scaled_dot_product_attention(q, k, v), None
