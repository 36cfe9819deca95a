"""A picture of the background-threshold sweep (``curve.png``), drawn with OpenCV."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io import save_image
from .folder import best_threshold
def _nice_step(span: float, target: int) -> float:
    """A 1/2/5 x 10^n step giving about ``target`` ticks over ``span``."""
    raw = max(span, 1e-9) / max(target, 1)
    mag = 10 ** np.floor(np.log10(raw))
    for mult in (1, 2, 5, 10):
        if mult * mag >= raw:
            return float(mult * mag)
    return float(10 * mag)


def plot_curve(curve: Sequence[tuple[float, float]], path: str | os.PathLike,
               title: str = "mIoU vs background threshold (best point chosen with ground truth)") -> Path:
    """Draw the curve with OpenCV: axes, labelled ticks, the line and the best point marked; write a PNG
    (atomic) to ``path`` and return it."""
    import cv2


    points = [(float(t), float(m)) for t, m in curve if m is not None]
    if not points:
        raise ValueError("nothing to plot: the curve has no defined mIoU")
    width, height = 900, 540
    left, right, top, bottom = 80, 30, 50, 70
    img = np.full((height, width, 3), 255, np.uint8)
    ts = np.array([p[0] for p in points])
    ms = np.array([p[1] for p in points])
    x0, x1 = float(ts.min()), float(ts.max())
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.05, x1 + 0.05
    y_step = _nice_step(float(ms.max() - ms.min()), 6)
    y0 = np.floor(ms.min() / y_step) * y_step
    y1 = np.ceil(ms.max() / y_step) * y_step
    if y1 - y0 < 1e-9:  # a flat curve still needs a visible y range
        y0, y1 = max(0.0, y0 - y_step), y1 + y_step

    def px(t: float, m: float) -> tuple[int, int]:
        x = left + (t - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (m - y0) / (y1 - y0) * (height - top - bottom)
        return int(round(x)), int(round(y))

    black, grey, blue, red = (0, 0, 0), (220, 220, 220), (31, 119, 180), (214, 39, 40)
    font = cv2.FONT_HERSHEY_SIMPLEX
    # grid and ticks
    x_step = _nice_step(x1 - x0, 8)
    t = np.ceil(x0 / x_step - 1e-9) * x_step
    while t <= x1 + 1e-9:
        x, _ = px(t, y0)
        cv2.line(img, (x, top), (x, height - bottom), grey, 1)
        cv2.line(img, (x, height - bottom), (x, height - bottom + 5), black, 1)
        label = f"{abs(t) if abs(t) < 1e-9 else t:.2f}"  # no "-0.00"
        size = cv2.getTextSize(label, font, 0.45, 1)[0]
        cv2.putText(img, label, (x - size[0] // 2, height - bottom + 20), font, 0.45, black, 1, cv2.LINE_AA)
        t += x_step
    m = y0
    while m <= y1 + 1e-9:
        _, y = px(x0, m)
        cv2.line(img, (left, y), (width - right, y), grey, 1)
        cv2.line(img, (left - 5, y), (left, y), black, 1)
        label = f"{m:g}"
        size = cv2.getTextSize(label, font, 0.45, 1)[0]
        cv2.putText(img, label, (left - 9 - size[0], y + size[1] // 2), font, 0.45, black, 1, cv2.LINE_AA)
        m += y_step
    # axes and labels
    cv2.line(img, (left, top), (left, height - bottom), black, 1)
    cv2.line(img, (left, height - bottom), (width - right, height - bottom), black, 1)
    xlabel = "background threshold t"
    size = cv2.getTextSize(xlabel, font, 0.55, 1)[0]
    cv2.putText(img, xlabel, ((left + width - right - size[0]) // 2, height - 20), font, 0.55, black, 1, cv2.LINE_AA)
    ylabel = np.full((24, 120, 3), 255, np.uint8)
    cv2.putText(ylabel, "mIoU (%)", (4, 17), font, 0.55, black, 1, cv2.LINE_AA)
    ylabel = np.ascontiguousarray(np.rot90(ylabel))
    yy = (top + height - bottom - ylabel.shape[0]) // 2
    img[yy:yy + ylabel.shape[0], 4:4 + ylabel.shape[1]] = ylabel
    cv2.putText(img, title, (left, 30), font, 0.55, black, 1, cv2.LINE_AA)
    # the curve and the best point
    poly = np.array([px(t, m) for t, m in points], np.int32).reshape(-1, 1, 2)
    cv2.polylines(img, [poly], False, blue, 2, cv2.LINE_AA)
    bt, bm = best_threshold(points)
    bx, by = px(bt, bm)
    cv2.circle(img, (bx, by), 6, red, 2, cv2.LINE_AA)
    cv2.line(img, (bx, by + 8), (bx, height - bottom), red, 1)
    note = f"best t = {bt:.2f}, mIoU {bm:.2f} (GT-tuned)"
    size = cv2.getTextSize(note, font, 0.5, 1)[0]
    tx = min(max(left + 4, bx - size[0] // 2), width - right - size[0] - 4)
    ty = by - 20 if by - 20 - size[1] > top else by + 30
    cv2.rectangle(img, (tx - 3, ty - size[1] - 4), (tx + size[0] + 3, ty + 5), (255, 255, 255), -1)
    cv2.putText(img, note, (tx, ty), font, 0.5, red, 1, cv2.LINE_AA)
    return save_image(path, img)
