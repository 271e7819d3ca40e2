"""The loss-curve PNG that goes with every adapter, drawn with PIL (no matplotlib needed).

Per-step loss in light grey, a moving average on top, axes with min/max labels. The pixels
depend only on the losses, so the same run draws the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 36


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw_loss_curve(losses: list[float], path: Path, title: str = "training loss") -> None:
    """Write a PNG of `losses` (one per optimizer step) to `path`."""
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    finite = [v for v in losses if math.isfinite(v)]
    x0, y0, x1, y1 = _LEFT, _TOP, WIDTH - _RIGHT, HEIGHT - _BOTTOM
    draw.rectangle((x0, y0, x1, y1), outline=(80, 80, 80))
    draw.text((x0, 8), title, fill="black", font=font)
    if finite:
        lo, hi = min(finite), max(finite)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = len(losses)

        def point(i: int, v: float) -> tuple[float, float]:
            x = x0 + (x1 - x0) * (i / max(1, n - 1))
            y = y1 - (y1 - y0) * ((v - lo) / (hi - lo))
            return x, y

        raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        if len(raw) > 1:
            draw.line(raw, fill=(190, 190, 190), width=1)
        smooth = moving_average(finite, max(1, n // 20))
        pts = [point(i, v) for i, v in enumerate(smooth)]
        if len(pts) > 1:
            draw.line(pts, fill=(31, 119, 180), width=2)
        draw.text((4, y0), f"{hi:.4g}", fill="black", font=font)
        draw.text((4, y1 - 10), f"{lo:.4g}", fill="black", font=font)
        draw.text((x0, y1 + 6), "1", fill="black", font=font)
        draw.text((x1 - 40, y1 + 6), f"{n} steps", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)
