"""A tiny "picture world": real drawn images of coloured shapes, captions that name them, and an exact reader.

Why: the CPU-laptop demo must train everything (text LLM, VQ image tokenizer,
image model, fusion) in minutes and still mean something. Made-up code lists
cannot exercise a real image tokenizer, and web images are far too hard to
learn in minutes. This world is small enough to learn and real enough to test:
every image is an ordinary PNG of one coloured shape on a white background,
drawn with Pillow, and every caption names exactly what is drawn. Because the
world is closed, a generated picture can be graded exactly:
:func:`read_attributes` recovers colour and shape from pixels, so prompt
following ("a picture of a red circle .") becomes a number (:func:`score`).

How it differs from the made-up code lists the demo used before: images are
pixels, so a VQ tokenizer is trained and used for real;
the interleaved documents hold several images with text between them
(how-to texts whose steps show pictures); and an evaluation prompt set is
written. The module knows nothing of the project's vocabulary: it writes
image files, JSON Lines in the input format of ``tools/preprocess_interleaved.py``
and a sentencepiece model. CLI::

    python -m megatron_jam.data.picture_world OUT_DIR [--seed N] [--image-size PX] ...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
from collections import deque
from typing import Iterable, List, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from megatron_jam.utils.logging import get_logger

logger = get_logger("megatron_jam.data.picture_world")

# Pillow standard colour names, pairwise >= 180 apart in RGB (orange was left out: it is only 90 from yellow).
COLOURS = ["red", "blue", "green", "yellow", "purple", "cyan"]
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["is next to", "is above", "is below", "is bigger than", "is smaller than"]
FACTS = {"circle": "a circle is round .", "square": "a square has four corners .",
         "triangle": "a triangle has three corners ."}
WHITE = np.array([255.0, 255.0, 255.0])
SIZE_RANGE = (0.45, 0.80)  # side of the shape as a fraction of the canvas
FILES = {"text": "text.jsonl", "imgtext": "imgtext.jsonl", "interleaved": "interleaved.jsonl",
         "tokenizer": "spm.model", "prompts": "prompts.jsonl", "world": "world.json", "images": "images"}


def rgb(colour: str) -> tuple:
    """The RGB triple of a world colour (Pillow's standard colour name)."""
    return ImageColor.getrgb(colour)[:3]


# --------------------------------------------------------------------------- drawing
def draw(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One `shape` in `colour` on a white `size` x `size` RGB canvas; side and position jittered, fully inside."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown colour/shape {colour!r}/{shape!r}; the world has {COLOURS} x {SHAPES}")
    side = rng.randint(round(SIZE_RANGE[0] * size), round(SIZE_RANGE[1] * size))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    img = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(img)
    fill = rgb(colour)
    if shape == "circle":
        pen.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        pen.rectangle([x0, y0, x1, y1], fill=fill)
    else:  # upward triangle: apex at the top centre, base on the bottom edge of the box
        pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


# --------------------------------------------------------------------------- language
def caption(colour: str, shape: str) -> str:
    """The caption of a drawing: ``a picture of a red circle .``."""
    return f"a picture of a {colour} {shape} ."


def _thing(rng: random.Random) -> tuple:
    return rng.choice(COLOURS), rng.choice(SHAPES)


def sentence(rng: random.Random) -> str:
    """One sentence of the small language (relations between shapes, shape facts, short descriptions)."""
    (c1, s1), (c2, s2) = _thing(rng), _thing(rng)
    kind = rng.random()
    if kind < 0.6:
        return f"the {c1} {s1} {rng.choice(RELATIONS)} the {c2} {s2} ."
    if kind < 0.8:
        return FACTS[s1]
    return f"the {s1} is {c1} ."


def how_to_steps(things: Sequence[tuple]) -> tuple:
    """(title, step texts) of a how-to for drawing `things`; step i names exactly things[i]."""
    names = [f"a {c} {s}" for c, s in things]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + f" and {names[-1]}"
    steps = [f"{'first' if i == 0 else 'then'} , draw {n} ." for i, n in enumerate(names)]
    return f"how to draw {listed} .", steps


def text_doc(rng: random.Random) -> str:
    """A text-only document: a few sentences, sometimes a how-to without its pictures."""
    if rng.random() < 0.2:
        title, steps = how_to_steps([_thing(rng) for _ in range(rng.randint(1, 3))])
        return " ".join([title, *steps, "done ."])
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))


def vocabulary_sentences() -> List[str]:
    """Sentences that together use every word of the world (so the tokenizer knows them all)."""
    out = [caption(c, s) for c in COLOURS for s in SHAPES] + list(FACTS.values())
    out += [f"the {s} is {c} ." for c in COLOURS for s in SHAPES]
    out += [f"the red circle {r} the blue square ." for r in RELATIONS]
    title, steps = how_to_steps([("red", "circle"), ("blue", "square"), ("green", "triangle")])
    return out + [" ".join([title, *steps, "done ."])]


# --------------------------------------------------------------------------- writing
class _ImageWriter:
    """Draws and saves images as ``images/NNNNN.png``; returns paths relative to the JSONL folder."""

    def __init__(self, out_dir: str, rng: random.Random, size: int) -> None:
        self.out_dir, self.rng, self.size, self.count = out_dir, rng, size, 0
        os.makedirs(os.path.join(out_dir, FILES["images"]), exist_ok=True)

    def __call__(self, colour: str, shape: str) -> str:
        rel = f"{FILES['images']}/{self.count:05d}.png"
        draw(colour, shape, self.rng, self.size).save(os.path.join(self.out_dir, rel), format="PNG")
        self.count += 1
        return rel


def _write_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _imgtext_records(n: int, rng: random.Random, images: _ImageWriter) -> Iterable[dict]:
    for i in range(n):
        colour, shape = _thing(rng)
        content = [{"text": caption(colour, shape)}, {"image": images(colour, shape)}]
        if rng.random() < 0.3:
            after = rng.choice([f"the {shape} is {colour} .", FACTS[shape], sentence(rng)])
            content.append({"text": after})
        yield {"id": f"imgtext-{i}", "content": content}


def _interleaved_records(n: int, rng: random.Random, images: _ImageWriter) -> Iterable[dict]:
    for i in range(n):
        things = [_thing(rng) for _ in range(rng.randint(2, 3))]
        title, steps = how_to_steps(things)
        content = []
        for j, ((colour, shape), step) in enumerate(zip(things, steps)):
            content.append({"text": f"{title} {step}" if j == 0 else step})
            content.append({"image": images(colour, shape)})
        content.append({"text": "done ."})
        yield {"id": f"interleaved-{i}", "content": content}


def texts_of(path: str) -> List[str]:
    """All text of a JSONL file of the world (``text`` records and ``content`` text items)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            out += [rec["text"]] if "text" in rec else [it["text"] for it in rec["content"] if "text" in it]
    return out


def train_sentencepiece(texts: List[str], path: str) -> None:
    """A word-level sentencepiece model with the settings of the tiny corpus (unk 0, eos 1, no bos/pad)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts + vocabulary_sentences()), model_writer=model,
                                   vocab_size=64, hard_vocab_limit=False, model_type="word",
                                   character_coverage=1.0, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(model.getvalue())


def write_world(out_dir: str, seed: int = 0, num_text_docs: int = 1500, num_image_text_docs: int = 1500,
                num_interleaved_docs: int = 300, image_size: int = 32) -> dict:
    """Write the whole world under `out_dir` (see the module docstring); returns the ``world.json`` dict.

    Each part draws from its own seeded stream, so the same seed gives byte-identical
    JSONL files and identical pixels.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = {k: os.path.join(out_dir, v) for k, v in FILES.items()}
    rng = {part: random.Random(f"picture-world:{seed}:{part}") for part in ("text", "images", "imgtext", "how-to")}
    _write_jsonl(path["text"], ({"id": f"text-{i}", "text": text_doc(rng["text"])} for i in range(num_text_docs)))
    images = _ImageWriter(out_dir, rng["images"], image_size)
    _write_jsonl(path["imgtext"], _imgtext_records(num_image_text_docs, rng["imgtext"], images))
    _write_jsonl(path["interleaved"], _interleaved_records(num_interleaved_docs, rng["how-to"], images))
    _write_jsonl(path["prompts"], ({"name": f"{c}_{s}", "prompt": caption(c, s), "colour": c, "shape": s}
                                   for c in COLOURS for s in SHAPES))
    texts = [t for k in ("text", "imgtext", "interleaved") for t in texts_of(path[k])]
    train_sentencepiece(texts, path["tokenizer"])
    world = {"colours": [{"name": c, "rgb": list(rgb(c))} for c in COLOURS], "shapes": list(SHAPES),
             "image_size": image_size, "seed": seed,
             "counts": {"text_docs": num_text_docs, "image_text_docs": num_image_text_docs,
                        "interleaved_docs": num_interleaved_docs, "images": images.count,
                        "prompts": len(COLOURS) * len(SHAPES)},
             "files": dict(FILES)}
    with open(path["world"], "w", encoding="utf-8") as f:
        json.dump(world, f, indent=1)
    return world


# --------------------------------------------------------------------------- reading
class Attributes(NamedTuple):
    """What :func:`read_attributes` sees; an attribute is None when there is no clear answer."""

    colour: Optional[str]
    shape: Optional[str]


FOREGROUND_DISTANCE = 80.0  # RGB distance from the background beyond which a pixel is clearly not background
MIN_FOREGROUND = 0.03  # least foreground share of the canvas (the smallest drawing covers ~10%)
MAX_COLOUR_RESIDUAL = 120.0  # farther than this from every colour's white->colour segment: no colour
MIN_CHROMA = 64.0  # max - min channel of the figure's median pixel below this: grey, no colour
MIN_AGREEMENT = 0.6  # least share of core pixels that must read as the chosen colour on their own
MIN_FIGURE_SHARE = 0.6  # least share of the shape mask that the largest component must hold


def _as_array(image) -> np.ndarray:
    """HxWx3 float RGB of a PIL image, an array or an image file path."""
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float64)[..., :3]


def _background(px: np.ndarray) -> np.ndarray:
    """The background colour: the median border pixel when it is a light grey (a reconstruction
    may dim or tint the white), else white. Figures never cover half the border."""
    border = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])
    bg = np.median(border, axis=0)
    return bg if bg.min() >= 128 and bg.max() - bg.min() < MIN_CHROMA else WHITE


def _segment_residuals(pixels: np.ndarray) -> np.ndarray:
    """(N, colours) distances from each pixel to each colour's segment white -> colour.

    A pale blend of a colour with the white background (a soft edge) lies on the
    segment, so it still reads as that colour.
    """
    d = WHITE - np.array([rgb(c) for c in COLOURS], dtype=np.float64)  # (C, 3)
    a = np.clip(((WHITE - pixels) @ d.T) / (d * d).sum(axis=1), 0.0, 1.0)  # (N, C)
    nearest = WHITE - a[..., None] * d  # (N, C, 3)
    return np.linalg.norm(nearest - pixels[:, None, :], axis=-1)


def _colour_of(core: np.ndarray) -> Optional[str]:
    """The named colour of the figure's most saturated pixels `core` (N, 3), or None if unclear.

    The median pixel picks the colour; it must be chromatic (not grey), near that
    colour's segment, and agree with most core pixels taken one by one (not a mix).
    """
    median = np.median(core, axis=0)
    if median.max() - median.min() < MIN_CHROMA:
        return None
    residual = _segment_residuals(median[None])[0]
    best = int(residual.argmin())
    if residual[best] > MAX_COLOUR_RESIDUAL:
        return None
    agree = (_segment_residuals(core).argmin(axis=1) == best).mean()
    return COLOURS[best] if agree >= MIN_AGREEMENT else None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (breadth-first search; images are tiny)."""
    seen = np.zeros_like(mask)
    best: List[tuple] = []
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], comp, todo = True, [], deque([start])
        while todo:
            y, x = todo.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _shape_of(mask: np.ndarray) -> Optional[str]:
    """Shape from the geometry of a foreground mask (None when it fits no shape of the world,
    e.g. a figure filling the canvas).

    Triangle: mass sits low in its bounding box (centroid at 2/3 of the height
    instead of 1/2) and the top quarter is much narrower than the bottom quarter;
    the two cues are summed so that blur, which shaves the apex, rarely defeats
    both. Otherwise the fill ratio of the box separates square (1.0) from circle
    (pi/4 ~ 0.785); the cut is below the midpoint because blur rounds corners.
    """
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    if h < 3 or w < 3 or not 0.5 <= h / w <= 2.0 or max(h, w) > 0.9 * max(mask.shape):
        return None
    widths = box.sum(axis=1)
    quarter = max(1, h // 4)
    narrowing = 1.0 - widths[:quarter].mean() / widths[-quarter:].mean()  # ~0.85 triangle, ~0 otherwise
    lowness = (ys.mean() - ys.min()) / (h - 1) - 0.5  # ~0.17 triangle, ~0 otherwise
    if 10.0 * lowness + 0.5 * narrowing >= 0.7:
        return "triangle"
    fill = box.mean()
    if fill < 0.6:
        return None
    return "square" if fill >= 0.86 else "circle"


def read_attributes(image) -> Attributes:
    """Colour and shape of the one figure in `image` (PIL image, HxWx3 array or path).

    Foreground = pixels more than ``FOREGROUND_DISTANCE`` from the background (white,
    or the light grey of the border, see :func:`_background`). Its most saturated half
    (the core) gives the median pixel; the colour is the named colour whose
    white->colour segment is nearest to it (see :func:`_colour_of`). The shape mask is
    every pixel at least half-way from the background to that median (threshold at half
    contrast, so blur keeps the geometry), reduced to its largest connected component;
    see :func:`_shape_of`.
    Both are None when less than ``MIN_FOREGROUND`` of the canvas is foreground; the
    shape is None too when that component is not most of the mask (several figures).
    """
    px = _as_array(image)
    bg = _background(px)
    dist = np.linalg.norm(px - bg, axis=-1)
    fg = dist > FOREGROUND_DISTANCE
    if fg.sum() < MIN_FOREGROUND * fg.size:
        return Attributes(None, None)
    core = fg & (dist >= np.median(dist[fg]))
    colour = _colour_of(px[core])
    d = bg - np.median(px[core], axis=0)
    alpha = ((bg - px) @ d) / max(float(d @ d), 1e-6)
    figure = alpha >= 0.5
    mask = _largest_component(figure)
    one_figure = mask.sum() >= max(MIN_FOREGROUND * mask.size, MIN_FIGURE_SHARE * figure.sum())
    shape = _shape_of(mask) if one_figure else None
    return Attributes(colour, shape)


def score(images: Sequence, expected: Sequence) -> dict:
    """Colour / shape / joint accuracy of `images` against `expected` ((colour, shape) pairs or dicts)."""
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expectations")
    hits = {"colour": 0, "shape": 0, "joint": 0, "no_foreground": 0}
    for image, want in zip(images, expected):
        want = (want["colour"], want["shape"]) if isinstance(want, dict) else tuple(want)
        got = read_attributes(image)
        hits["colour"] += got.colour == want[0]
        hits["shape"] += got.shape == want[1]
        hits["joint"] += tuple(got) == want
        hits["no_foreground"] += got == (None, None)
    n = max(len(images), 1)
    return {"n": len(images), "colour_accuracy": hits["colour"] / n, "shape_accuracy": hits["shape"] / n,
            "joint_accuracy": hits["joint"] / n, "no_foreground": hits["no_foreground"]}


# --------------------------------------------------------------------------- CLI
def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-text-docs", type=int, default=1500)
    p.add_argument("--num-image-text-docs", type=int, default=1500)
    p.add_argument("--num-interleaved-docs", type=int, default=300)
    p.add_argument("--image-size", type=int, default=32)
    a = p.parse_args(argv)
    start = time.perf_counter()
    world = write_world(a.out_dir, a.seed, a.num_text_docs, a.num_image_text_docs, a.num_interleaved_docs,
                        a.image_size)
    summary = {"out_dir": a.out_dir, **world["counts"], "image_size": a.image_size, "seed": a.seed,
               "seconds": round(time.perf_counter() - start, 2)}
    logger.info("%s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
