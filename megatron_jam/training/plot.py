"""`python -m megatron_jam.training.plot RUN_DIR`: the loss curve of a run as a PNG, with Pillow only.

Why not matplotlib: the laptop default must work with the project's own
dependencies. Reads `RUN_DIR/metrics.jsonl` (or a given file) and draws the
training loss over all tokens, over text and image targets, and the validation
points of every validation set (`--valid-data-path NAME=PREFIX`: one colour and
one legend entry per set name), to `RUN_DIR/loss.png`.
"""

import argparse
import json
import math
import os
import sys

from PIL import Image, ImageDraw

from megatron_jam.utils.cli import add_debug_arg, run_cli
from megatron_jam.utils.logging import get_logger

W, H, PAD = 900, 520, 60
SERIES = (("lm_loss", (31, 119, 180), "loss (all tokens)"), ("text_loss", (44, 160, 44), "text targets"),
          ("image_loss", (214, 39, 40), "image targets"))
VALID_PREFIX = "valid:"  # series key of a validation set: "valid:<name>"
VALID_COLORS = ((0, 0, 0), (148, 103, 189), (255, 127, 14), (140, 86, 75), (227, 119, 194), (23, 190, 207))


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """Training series by `SERIES` key, and one "valid:<name>" series per validation set (in order of
    first appearance; records without a set name are the default set, "valid")."""
    series: dict[str, list[tuple[int, float]]] = {k: [] for k, _, _ in SERIES}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            found = {k: r.get(k) for k in series if not k.startswith(VALID_PREFIX)}
            if "valid_lm_loss" in r:
                found = {VALID_PREFIX + str(r.get("valid_set") or "valid"): r["valid_lm_loss"]}
            for key, v in found.items():
                if v is not None and math.isfinite(v):
                    series.setdefault(key, []).append((r["iteration"], v))
    return series


def legend(series: dict) -> list[tuple[str, tuple, str]]:
    """(key, colour, label) of every series to draw: the training ones, then each validation set by name."""
    valid = [k for k in series if k.startswith(VALID_PREFIX)]
    return list(SERIES) + [(k, VALID_COLORS[i % len(VALID_COLORS)], f"validation {k[len(VALID_PREFIX):]}")
                           for i, k in enumerate(valid)]


def plot(series: dict, out: str, title: str) -> None:
    points = [p for s in series.values() for p in s]
    if not points:
        raise ValueError("no finite losses to plot")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)
    sx = lambda x: PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)  # noqa: E731
    sy = lambda y: H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)  # noqa: E731
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([PAD, PAD, W - PAD, H - PAD], outline=(120, 120, 120))
    d.text((PAD, 20), title, fill="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        d.text((5, sy(y) - 6), f"{y:.2f}", fill="black")
        x = x0 + (x1 - x0) * i / 4
        d.text((sx(x) - 10, H - PAD + 8), f"{x:.0f}", fill="black")
    d.text((W // 2 - 30, H - 25), "iteration", fill="black")
    for n, (key, color, label) in enumerate(legend(series)):
        pts = [(sx(x), sy(y)) for x, y in series.get(key, [])]
        valid = key.startswith(VALID_PREFIX)
        if len(pts) > 1 and not valid:
            d.line(pts, fill=color, width=2)
        for p in pts if valid else []:
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=color)
        d.text((W - PAD - 170, PAD + 10 + 16 * n), f"{'o' if valid else '--'} {label}", fill=color)
    img.save(out)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a --save directory (holding metrics.jsonl)")
    p.add_argument("--metrics-file", default=None)
    p.add_argument("--output", default=None, help="default: RUN_DIR/loss.png")
    add_debug_arg(p)
    args = p.parse_args(argv)
    metrics = args.metrics_file or os.path.join(args.run_dir, "metrics.jsonl")
    out = args.output or os.path.join(args.run_dir, "loss.png")
    plot(read_metrics(metrics), out, f"JAM training loss: {os.path.abspath(args.run_dir)}")
    return out


def _cli(argv: list[str]) -> None:
    get_logger(__name__).info("%s", main(argv))


if __name__ == "__main__":  # a missing metrics file or nothing to plot: one line, exit code 2
    sys.exit(run_cli(_cli, extra_errors=(ValueError,)))
