"""The pictures that go with an adapter, drawn with PIL (no matplotlib needed).

The loss curve: per-step loss in light grey, a moving average on top, axes with min/max labels.
The sample grid: validation images in a near-square grid, each labelled with its prompt. The
pixels depend only on the inputs and PNGs carry no timestamps, so the same run draws the same
bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

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
    save_png(img, path)


def save_png(img: Image.Image, path: Path) -> None:
    """Write `img` as a PNG with no metadata chunks (no time, no software): bytes repeat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=False)


# -- sample grids ---------------------------------------------------------------------------

_GAP = 4  # pixels between cells and around the grid
_LABEL_LINES = 2  # a prompt is wrapped to this many lines, the rest elided
_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass(frozen=True)
class GridLayout:
    """Where each cell of a sample grid goes: `cols` x `rows` cells of `cell` px, each with a
    label strip of `label_h` px below it, under a title strip of `title_h` px."""

    n: int
    cell: int
    cols: int
    rows: int
    font_size: int
    label_h: int
    title_h: int

    @classmethod
    def for_cells(cls, n: int, cell: int) -> GridLayout:
        """Near-square: ceil(sqrt(n)) columns, as many rows as needed; text scales with cells."""
        cols = max(1, math.ceil(math.sqrt(n)))
        rows = max(1, math.ceil(n / cols))
        font_size = max(10, min(28, cell // 20))
        line_h = font_size + 2
        return cls(n, cell, cols, rows, font_size, _LABEL_LINES * line_h + 4, line_h + 6)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid image."""
        width = _GAP + self.cols * (self.cell + _GAP)
        return width, self.title_h + _GAP + self.rows * (self.cell + self.label_h + _GAP)

    def cell_box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of image `i` in the grid, row by row."""
        row, col = divmod(i, self.cols)
        left = _GAP + col * (self.cell + _GAP)
        top = self.title_h + _GAP + row * (self.cell + self.label_h + _GAP)
        return left, top, left + self.cell, top + self.cell


def draw_image_grid(images: list[Image.Image], labels: list[str], title: str) -> Image.Image:
    """`images` (square, one size) in a near-square grid, each with its label wrapped below it,
    and `title` on top."""
    cell = images[0].width
    layout = GridLayout.for_cells(len(images), cell)
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    font = _font(layout.font_size)
    line_h = layout.font_size + 2
    draw.text(
        (_GAP, 3), _elide(draw, title, font, layout.size[0] - 2 * _GAP), fill="black", font=font
    )
    for i, (img, label) in enumerate(zip(images, labels)):
        left, top, right, bottom = layout.cell_box(i)
        grid.paste(img.convert("RGB").resize((cell, cell)), (left, top))
        for k, line in enumerate(_wrap(draw, label, font, right - left, _LABEL_LINES)):
            draw.text((left, bottom + 2 + k * line_h), line, fill=(40, 40, 40), font=font)
    return grid


def _font(size: int) -> _Font:
    """PIL's bundled font at `size` px where FreeType is there, else its fixed bitmap font."""
    if features.check("freetype2"):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has no sized default font
            pass
    return ImageFont.load_default()


def _elide(draw: ImageDraw.ImageDraw, text: str, font: _Font, width: int) -> str:
    """`text`, cut with '...' to fit `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: _Font, width: int, max_lines: int
) -> list[str]:
    """Greedy word wrap of `text` into at most `max_lines` lines of `width` px; the last line
    takes the rest, elided."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines - 1:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(_elide(draw, line, font, width))
    if words:
        lines.append(_elide(draw, " ".join(words), font, width))
    return lines
