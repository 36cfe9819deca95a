"""Mixed precision: the autocast context of the ``amp`` config key, shared by training and inference."""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("none", "fp16", "bf16")


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp``: fp16 or bf16 on CUDA, bf16 on CPU (oneDNN bf16 kernels: about 1.6x
    faster convolutions on CPUs with AVX512-BF16/AMX, see :func:`cpu_has_fast_bf16`); a no-op context for
    ``none`` and for fp16 on CPU (fp32 there)."""
    if amp in (None, "", "none"):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp={amp!r}: expected none, fp16 or bf16")
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
