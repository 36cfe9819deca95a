"""Multi-scale x flip inference of a segmentation network, on the model's device.

Per image and scale s, the network's logits (K, h_s, w_s) are upsampled bilinearly (align_corners=False) to the
output size (H, W), turned into probabilities by a softmax over the K classes, and summed; with ``flip`` the
horizontally flipped image goes through the network too and its probabilities are flipped back and added. The
result is the mean over the (scales x flips) passes: probabilities (K, H, W) that sum to 1 at every pixel.
Only the final probabilities leave the device.

Images of one batch that have the same size at a scale go through the network together (no padding, so an
image's probabilities never depend on the other images of its batch); on a GPU the flipped copies share that
batch, on a CPU they are a second pass (as :func:`smaf.cam.fusion.fuse_image` does, for the same reason: a
doubled batch's activations page-fault anew at every op there).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..amp import autocast_context
from ..data.transforms import normalize, resize_image
from ..io import load_image


def upsampled_probabilities(logits: torch.Tensor, size: tuple) -> torch.Tensor:
    """logits (B, K, h, w) -> float32 softmax over K of the logits upsampled bilinearly to ``size`` = (H, W):
    (B, K, H, W)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def segment_batch(model, scaled: list, out_sizes: list, flip: bool = True, amp: str = "none",
                  flip_in_batch: bool | None = None, channels_last: bool = False) -> list:
    """Averaged class probabilities of a batch of images.

    Args:
        model: a segmentation network in eval mode, ``forward(x (B, 3, h, w)) -> logits (B, K, h', w')``.
        scaled: per image, the list of its normalised inputs (3, h_s, w_s), one per scale (CPU or device
            tensors; every image has the same number of scales).
        out_sizes: per image, the (H, W) of its probabilities (its original size).
        flip: also run the horizontally flipped inputs and un-flip their probabilities.
        amp: the autocast mode of the forward passes (the probabilities are float32 either way).
        flip_in_batch: the flipped copies in the same batch as the originals (default: on a GPU, not on a CPU).
        channels_last: channels-last inputs on CUDA.

    Returns one float32 tensor (K, H_i, W_i) per image, on the model's device: the mean over scales (x flips) of
    the softmax of the upsampled logits.
    """
    if len(scaled) != len(out_sizes):
        raise ValueError(f"segment_batch: {len(scaled)} images but {len(out_sizes)} output sizes")
    if not scaled:
        return []
    num_scales = len(scaled[0])
    if num_scales == 0 or any(len(s) != num_scales for s in scaled):
        raise ValueError("segment_batch: every image needs the same, non-zero number of scaled inputs")
    device = next(model.parameters()).device
    stack_flip = flip and (device.type != "cpu" if flip_in_batch is None else flip_in_batch)
    totals: list = [None] * len(scaled)
    for s in range(num_scales):
        groups: dict = {}
        for i, inputs in enumerate(scaled):
            groups.setdefault(tuple(inputs[s].shape), []).append(i)
        for members in groups.values():
            x = torch.stack([scaled[i][s] for i in members]).to(device, non_blocking=True)
            n = len(members)
            if stack_flip:
                passes = [torch.cat([x, x.flip(-1)])]
            else:
                passes = [x, x.flip(-1)] if flip else [x]
            outs = []
            for batch in passes:
                if channels_last and device.type == "cuda":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with autocast_context(device, amp):
                    outs.append(model(batch))
            logits = torch.cat(outs) if len(outs) > 1 else outs[0]
            for j, i in enumerate(members):
                probs = upsampled_probabilities(logits[j:j + 1], out_sizes[i])[0]
                if flip:
                    probs = probs + upsampled_probabilities(logits[n + j:n + j + 1], out_sizes[i])[0].flip(-1)
                totals[i] = probs if totals[i] is None else totals[i] + probs
    passes_per_image = num_scales * (2 if flip else 1)
    return [t / passes_per_image for t in totals]


def segment_image(model, scaled: list, out_size: tuple, flip: bool = True, amp: str = "none",
                  flip_in_batch: bool | None = None) -> torch.Tensor:
    """:func:`segment_batch` of one image: ``scaled`` its inputs per scale -> probabilities (K, H, W)."""
    return segment_batch(model, [scaled], [out_size], flip, amp, flip_in_batch)[0]


def scaled_size(height: int, width: int, scale: float, base_long: int = 0) -> tuple[int, int]:
    """The network input size of an (H, W) image at ``scale``: (round(h s), round(w s)) where (h, w) = (H, W),
    or with ``base_long`` > 0 the size whose long side is ``base_long``; at least 1 x 1."""
    if base_long:
        ratio = base_long / max(height, width)
        height, width = max(1, round(height * ratio)), max(1, round(width * ratio))
    return max(1, round(height * scale)), max(1, round(width * scale))


class SegImageDataset(Dataset):
    """Whole images for segmentation inference, from ``(name, path)`` pairs (ids of a dataset or any files).

    Items: ``{'id': name, 'path': str, 'image': uint8 (H, W, 3) the original RGB image, 'scaled': [normalised
    float32 (3, h_s, w_s) per scale]}``, resized bicubically (``resize``: ``cv2`` or ``pil``, see
    :func:`smaf.data.transforms.resize_image`) to :func:`scaled_size`."""

    def __init__(self, items: list, scales=(1.0,), base_long: int = 0, resize: str = "cv2"):
        self.items = [(str(n), str(p)) for n, p in items]
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"inference scales must be a non-empty list of positive numbers, got {list(scales)}")
        self.base_long, self.resize = int(base_long), resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        name, path = self.items[index]
        image = load_image(Path(path))
        h, w = image.shape[:2]
        scaled = [torch.from_numpy(normalize(resize_image(image, scaled_size(h, w, s, self.base_long), self.resize)))
                  for s in self.scales]
        return {"id": name, "path": path, "image": image, "scaled": scaled}


def collate_list(batch: list) -> list:
    """Collate for inference loaders: the list of samples as it is (images differ in size)."""
    return batch
