"""The study's two figures as PNG files, drawn with Pillow: loss curves and a bar chart.

Why Pillow and not matplotlib: like megatron_jam/training/plot.py, the study must
run with the project's own dependencies (matplotlib is not one of them). The
figures are simple enough: lines over iterations, and bars with their values.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PAD = 60


def _frame(d: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], title: str) -> None:
    d.rectangle(box, outline=(120, 120, 120))
    d.text((box[0], box[1] - 18), title, fill="black")


def _ticks(d, box, y0: float, y1: float, x0: Optional[float] = None, x1: Optional[float] = None) -> None:
    left, top, right, bottom = box
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        d.text((left - 50, bottom - (bottom - top) * i / 4 - 6), f"{y:.3g}", fill="black")
        if x0 is not None:
            d.text((left + (right - left) * i / 4 - 10, bottom + 6), f"{x0 + (x1 - x0) * i / 4:.0f}", fill="black")


def line_panel(d, box, title: str, series: Dict[str, List[Tuple[float, float]]]) -> None:
    """Lines of (x, y) points, one colour per series, with a legend in the upper right."""
    _frame(d, box, title)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        d.text((box[0] + 10, box[1] + 10), "no data", fill="black")
        return
    x0, x1 = min(p[0] for p in pts), max(max(p[0] for p in pts), min(p[0] for p in pts) + 1)
    y0, y1 = min(p[1] for p in pts), max(max(p[1] for p in pts), min(p[1] for p in pts) + 1e-6)
    left, top, right, bottom = box
    sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    _ticks(d, box, y0, y1, x0, x1)
    for n, (name, s) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        xy = [(sx(x), sy(y)) for x, y in s if math.isfinite(y)]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        d.text((right - 150, top + 8 + 15 * n), f"-- {name}", fill=colour)


def bar_panel(d, box, title: str, bars: Sequence[Tuple[str, Optional[float], Optional[float]]]) -> None:
    """One bar per (label, value, spread); the value is printed above the bar, the spread as a whisker."""
    _frame(d, box, title)
    values = [v for _, v, _ in bars if v is not None and math.isfinite(v)]
    if not values:
        d.text((box[0] + 10, box[1] + 10), "no data", fill="black")
        return
    left, top, right, bottom = box
    hi = max(v + (s or 0) for _, v, s in bars if v is not None) * 1.15 or 1.0
    _ticks(d, box, 0.0, hi)
    width = (right - left) / max(len(bars), 1)
    for n, (label, v, s) in enumerate(bars):
        x = left + n * width
        d.text((x + 4, bottom + 6 + 12 * (n % 2)), label, fill="black")
        if v is None:
            continue
        y = bottom - v / hi * (bottom - top)
        d.rectangle([x + width * 0.2, y, x + width * 0.8, bottom], fill=PALETTE[n % len(PALETTE)])
        d.text((x + width * 0.2, y - 14), f"{v:.3g}", fill="black")
        if s:
            ys = [bottom - (v + k * s) / hi * (bottom - top) for k in (-1, 1)]
            d.line([(x + width / 2, ys[0]), (x + width / 2, ys[1])], fill="black", width=2)


def draw_figure(path: str, panels: List[tuple], width: int = 1000, panel_height: int = 300) -> str:
    """Stack panels (kind, title, data) vertically into one PNG at `path`; kind is "line" or "bar"."""
    img = Image.new("RGB", (width, panel_height * len(panels) + 20), "white")
    d = ImageDraw.Draw(img)
    for i, (kind, title, data) in enumerate(panels):
        top = i * panel_height + 40
        box = (PAD, top, width - 20, top + panel_height - 80)
        (line_panel if kind == "line" else bar_panel)(d, box, title, data)
    img.save(path)
    return path
