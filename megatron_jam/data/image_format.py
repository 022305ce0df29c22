"""Image formats: how one image sits in the token stream.

Why one abstraction: preprocessing writes images (`documents.build_sequences`),
the CM3 transform must never split one (`cm3.segment_table`), the decoder must
force an image's structural tokens and sample only its codes
(`inference.decoding`), and rendering turns an image's ids back into a code
grid (`inference.render.segments`). All four ask the layout's format
(`VocabLayout.format`), so a parent's own image syntax is written once.

Formats:

- ``ours`` (the default; unchanged from before): an image is its codes alone,
  ``tokens_per_image`` of them, and ``<break>`` separates it from its
  neighbours (``text <break> codes <break> text``). The grid is not in the
  tokens: it is the layout's (square, or as square as possible).
- ``emu3`` (Emu3's `processing_emu3.py`): ``<|image start|>``, the latent grid
  size as text (``90*90``, one token per character), ``<|image token|>``, then
  h rows of w codes each followed by end-of-line ``<|extra_200|>``, then
  end-of-frame ``<|extra_201|>`` and ``<|image end|>``. No `<break>`: the
  markers delimit the image, and `<|image start|>` plays `<break>`'s role
  (`VocabLayout.break_id`). The grid is in the tokens, so images of any size
  may appear in data; `tokens_per_image` (= h * w of `image_grid`) is only the
  default size of generated images.
- ``chameleon`` (Chameleon 7B/30B, Anole; transformers' `processing_chameleon.py`
  `replace_image_token`: ``boi + image_token * 1024 + eoi``, and Meta's
  `chameleon/inference/vocab.py`: ``begin_image`` / ``end_image``):
  ``<racm3:break>`` (id 8197 in the released 65,536 vocabulary), the
  h * w = 1,024 codes of the 32x32 grid at 512 px (BPE tokens 4..8195,
  through the code -> id map), ``<eoss>`` (8196). No size and no row ends:
  the grid is the layout's.
- ``lumina`` (Lumina-mGPT, github Alpha-VLLM/Lumina-mGPT,
  `lumina_mgpt/data/item_processor.py` `FlexARItemProcessor.process_image`,
  and the `decode_image` / `MultiModalLogitsProcessor` of
  `lumina_mgpt/inference_solver.py` that read it back): ``<racm3:break>``, the
  height and width grid tokens ``get_n_grids_token(n) = <reserved{8800+n:05d}>``
  with n = pixels / 32 = latent rows / 2 (id 8804 + n: 512 px gives n = 16,
  ``<reserved08816>``, id 8820), then h latent rows of w codes each followed
  by the end-of-line token ``<reserved08799>`` (8803), then ``<eoss>``; at
  512 px 1 + 2 + 32 * 33 + 1 = 1,060 tokens. Lumina-mGPT's images come in
  several aspect ratios, so the grid is in the tokens (even sides only).

- ``liquid`` (Liquid-7B, github FoundationVision/Liquid: ``<boi><image><eoi>`` in
  `evaluation/inference_i2t.py`, generation from ``...<boi>`` for 1,024 codes in
  `evaluation/inference_t2i.py`): ``<boi>``, the 1,024 codes of Chameleon's VQGAN
  at 512 px (32x32), ``<eoi>``; the chameleon structure with Liquid's markers.
  Its codes follow the tokenizer's ids (code c = ``len(tokenizer) + c``,
  `liquid/expand_vocabulary.py`): `liquid_vocab.liquid_layout`.

In the delimited formats (emu3, chameleon, lumina, liquid) the begin-image token plays
`<break>`'s role (`VocabLayout.break_id`) and text resumes right after the
end-of-image token. All ids are looked up by token string in the parent's
tokenizer (`native_vocab.emu3_layout`, `chameleon_vocab.chameleon_layout`).

`image_length(grid)` counts an image from its opening token (`<break>` /
`<|image start|>`) to its last token: what the decoder must have left before
it may open one.
"""

from __future__ import annotations

import abc
import math
from typing import Dict, List, Tuple, Type

import numpy as np

Grid = Tuple[int, int]
EMU3_MARKERS = {"image_start": "<|image start|>", "size_end": "<|image token|>", "end_of_line": "<|extra_200|>",
                "end_of_frame": "<|extra_201|>", "image_end": "<|image end|>"}
"""Role -> token string of Emu3's image markers (ids are looked up in the parent's tokenizer.json)."""
CHAMELEON_MARKERS = {"image_start": "<racm3:break>", "image_end": "<eoss>"}
"""Role -> token string of Chameleon's begin-image / end-of-image tokens (ids 8197 / 8196 in the release)."""
LUMINA_MARKERS = {**CHAMELEON_MARKERS, "end_of_line": "<reserved08799>"}
"""Lumina-mGPT's markers: Chameleon's plus its end-of-line token (id 8803 in the release)."""
LIQUID_MARKERS = {"image_start": "<boi>", "image_end": "<eoi>"}
"""Liquid's begin-image / end-of-image tokens (added tokens of its Gemma tokenizer)."""
LUMINA_GRID_ROLE = "grid_{}"
"""Marker role of Lumina-mGPT's grid-size token for N patches of 32 pixels (2N latent rows or columns)."""
LUMINA_GRID_TOKEN = "<reserved{:05d}>"
LUMINA_GRID_BASE = 8800
"""Lumina-mGPT's `get_n_grids_token(n)`: `<reserved{8800 + n:05d}>` (id 8804 + n in the release)."""
SAMPLE = -1
"""In a decoding plan: a slot where the decoder samples an image code (other slots hold a forced id)."""


class ImageFormatError(ValueError):
    """A token sequence is not a well-formed image of the format, or codes do not fit it; one-line message."""


def grid_shape(n: int) -> Grid:
    """(rows, cols) of n codes: square when n is a square, else as square as possible."""
    rows = int(math.isqrt(max(1, n)))
    while n % rows:
        rows -= 1
    return rows, n // rows


class ImageFormat(abc.ABC):
    """How images of one layout are written in, found in, generated into and read from the token stream."""

    name: str
    uses_break: bool
    """Whether `<break>` separates an image from adjacent segments (else markers delimit the image)."""
    ends_in_text: bool
    """Whether decoding returns to free text right after an image (else it chooses `<eos>` or `<break>`)."""

    def __init__(self, layout) -> None:
        self.layout = layout

    @classmethod
    def validate(cls, layout) -> None:
        """Raise VocabLayoutError when a native layout lacks what this format needs."""

    @property
    def default_grid(self) -> Grid:
        """The grid of images given as a flat list of codes, and of generated images."""
        grid = self.layout.image_grid
        return (int(grid[0]), int(grid[1])) if grid else grid_shape(self.layout.tokens_per_image)

    def check_grid(self, grid: Grid, where: str) -> None:
        """Raise ImageFormatError when this format cannot hold an image of `grid`."""
        if grid[0] < 1 or grid[1] < 1:
            raise ImageFormatError(f"{where}: grid {grid[0]}x{grid[1]} must be at least 1x1")

    @abc.abstractmethod
    def image_ids(self, codes: np.ndarray, grid: Grid) -> np.ndarray:
        """Codes (flat, row-major) of one image -> the ids stored for it (its image-mode sequence)."""

    @abc.abstractmethod
    def plan(self, grid: Grid) -> np.ndarray:
        """The slots after the opening token that the decoder fills: a forced id, or SAMPLE for a code."""

    def image_length(self, grid: Grid) -> int:
        """Tokens from the image's opening token to its last one."""
        return 1 + int(self.plan(grid).size)

    @abc.abstractmethod
    def image_spans(self, tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(bounds [k, 2] half-open, complete [k] bool) of the images in a token window, in order; an image
        cut by the window's edge (or malformed) is incomplete."""

    @abc.abstractmethod
    def parse(self, ids: np.ndarray) -> Tuple[np.ndarray, Grid]:
        """(codes flat, grid) of one complete image span; ImageFormatError when malformed."""


class OursFormat(ImageFormat):
    """`<break>` + tokens_per_image codes (+ `<break>` before what follows)."""

    name, uses_break, ends_in_text = "ours", True, False

    def check_grid(self, grid: Grid, where: str) -> None:
        super().check_grid(grid, where)
        if grid[0] * grid[1] != self.layout.tokens_per_image:
            raise ImageFormatError(f"{where}: {grid[0] * grid[1]} codes, the layout needs "
                                   f"{self.layout.tokens_per_image} per image")

    def image_ids(self, codes: np.ndarray, grid: Grid) -> np.ndarray:
        return self.layout.image_ids(np.asarray(codes).reshape(-1))

    def plan(self, grid: Grid) -> np.ndarray:
        return np.full(self.layout.tokens_per_image, SAMPLE, dtype=np.int64)

    def image_spans(self, tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        img = self.layout.is_image(np.asarray(tokens)).astype(np.int8)
        edges = np.diff(np.concatenate([[0], img, [0]]))
        bounds = np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).astype(np.int64)
        return bounds, bounds[:, 1] - bounds[:, 0] == self.layout.tokens_per_image

    def parse(self, ids: np.ndarray) -> Tuple[np.ndarray, Grid]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0 or not self.layout.is_image(ids).all():
            raise ImageFormatError("an image of the 'ours' format holds image codes only")
        return self.layout.image_codes(ids), grid_shape(ids.size)


class DelimitedFormat(ImageFormat):
    """Images between their own begin-image and end-of-image markers (Emu3, Chameleon, Lumina-mGPT).

    `<break>` is the begin-image marker (no separate `<break>` token), and the stream returns to text right
    after the end-of-image marker. A subclass says how the structure around the code rows looks
    (`_structure`) and how the grid is read back from an image's ids (`_read_grid`); finding images in a
    window (`image_spans`), parsing and planning are shared.
    """

    uses_break, ends_in_text = False, True
    required_markers: Tuple[str, ...] = ("image_start", "image_end")
    inner_markers: Tuple[str, ...] = ()
    """Markers that occur only inside an image: a window that opens with one opens inside an image."""

    @classmethod
    def validate(cls, layout) -> None:
        missing = set(cls.required_markers) - set(layout.image_markers)
        if missing:
            _fail(f"the {cls.name} image format needs image_markers {sorted(missing)}")
        if layout.special_ids["<break>"] != layout.image_markers["image_start"]:
            _fail(f"in the {cls.name} format <break> is the image_start marker")
        if not layout.image_grid:
            _fail(f"the {cls.name} image format needs image_grid (h, w)")

    def __init__(self, layout) -> None:
        super().__init__(layout)
        m = layout.image_markers
        self.start, self.end = m["image_start"], m["image_end"]
        self.inner = [m[r] for r in self.inner_markers]

    @abc.abstractmethod
    def _structure(self, rows: np.ndarray, grid: Grid) -> np.ndarray:
        """Full image ids (begin-image first, end-of-image last) around `rows` ([h, w] of ids or SAMPLE)."""

    @abc.abstractmethod
    def _read_grid(self, ids: np.ndarray) -> Grid:
        """The grid an image span (begin-image .. end-of-image) declares; ImageFormatError when unreadable."""

    def image_ids(self, codes: np.ndarray, grid: Grid) -> np.ndarray:
        self.check_grid(grid, "image")
        ids = self.layout.image_ids(np.asarray(codes).reshape(-1))
        if ids.size != grid[0] * grid[1]:
            raise ImageFormatError(f"image: {ids.size} codes do not fill a {grid[0]}x{grid[1]} grid")
        return self._structure(ids.reshape(grid), grid)

    def plan(self, grid: Grid) -> np.ndarray:
        self.check_grid(grid, "image")
        return self._structure(np.full(grid, SAMPLE, dtype=np.int64), grid)[1:]

    def image_spans(self, tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        tokens = np.asarray(tokens, dtype=np.int64)
        m = tokens.size
        starts, ends = np.flatnonzero(tokens == self.start), np.flatnonzero(tokens == self.end)
        spans: List[Tuple[int, int]] = []
        first = int(starts[0]) if starts.size else m
        lead_ends = ends[ends < first]
        inside = self.layout.is_image(tokens[:first]) | np.isin(tokens[:first], self.inner)
        if lead_ends.size:  # the window opens inside an image
            spans.append((0, int(lead_ends[0]) + 1))
        elif inside.any():  # ... and the image goes past its end or the next image start
            spans.append((0, int(np.flatnonzero(inside)[-1]) + 1))
        pos = spans[-1][1] if spans else 0
        for s in starts.tolist():
            if s < pos:
                continue
            later = ends[ends > s]
            e = int(later[0]) + 1 if later.size else m
            nxt = starts[starts > s]
            if nxt.size and nxt[0] < e:  # an image start before this image ended: malformed, stop at it
                e = int(nxt[0])
            spans.append((s, e))
            pos = e
        bounds = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        complete = np.array([self._well_formed(tokens[a:b]) and not (a == 0 and tokens[0] != self.start)
                             for a, b in bounds.tolist()], dtype=bool)
        return bounds, complete

    def _well_formed(self, ids: np.ndarray) -> bool:
        try:
            self.parse(ids)
        except ImageFormatError:
            return False
        return True

    def parse(self, ids: np.ndarray) -> Tuple[np.ndarray, Grid]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size < 2 or ids[0] != self.start or ids[-1] != self.end:
            raise ImageFormatError(f"a {self.name} image starts with its begin-image and ends with its "
                                   "end-of-image token")
        grid = self._read_grid(ids)
        expected = self._structure(np.full(grid, SAMPLE, dtype=np.int64), grid)
        if expected.size != ids.size:
            raise ImageFormatError(f"a {self.name} image of grid {grid[0]}x{grid[1]} has {expected.size} tokens, "
                                   f"got {ids.size}")
        slots = expected == SAMPLE
        if not (ids[~slots] == expected[~slots]).all() or not self.layout.is_image(ids[slots]).all():
            raise ImageFormatError(f"a {self.name} image's tokens must follow its format: codes at code slots, "
                                   "markers at marker slots")
        return self.layout.image_codes(ids[slots]), grid


class Emu3Format(DelimitedFormat):
    """`<|image start|> h*w <|image token|> (w codes <eol>) x h <eof> <|image end|>`."""

    name = "emu3"
    required_markers = tuple(EMU3_MARKERS)
    inner_markers = ("end_of_line", "end_of_frame", "size_end")

    @classmethod
    def validate(cls, layout) -> None:
        super().validate(layout)
        if set(layout.size_digit_ids) != set("0123456789*"):
            _fail("the emu3 image format needs size_digit_ids for 0-9 and '*'")

    def __init__(self, layout) -> None:
        super().__init__(layout)
        m = layout.image_markers
        self.size_end, self.eol, self.eof = m["size_end"], m["end_of_line"], m["end_of_frame"]
        self.digit_of = {v: k for k, v in layout.size_digit_ids.items()}

    def size_ids(self, grid: Grid) -> List[int]:
        """The grid size as text ids ("90*90", one id per character)."""
        return [self.layout.size_digit_ids[c] for c in f"{grid[0]}*{grid[1]}"]

    def _structure(self, rows: np.ndarray, grid: Grid) -> np.ndarray:
        h, _ = grid
        body = np.concatenate([rows, np.full((h, 1), self.eol, dtype=np.int64)], axis=1).reshape(-1)
        return np.concatenate([[self.start], self.size_ids(grid), [self.size_end], body, [self.eof, self.end]]
                              ).astype(np.int64)

    def _read_grid(self, ids: np.ndarray) -> Grid:
        size_end = np.flatnonzero(ids == self.size_end)
        if size_end.size != 1:
            raise ImageFormatError("an emu3 image holds exactly one <|image token|> after its size")
        size = ids[1:size_end[0]]
        text = "".join(self.digit_of.get(int(t), "?") for t in size)
        parts = text.split("*")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ImageFormatError(f"an emu3 image size must read 'h*w', got {text!r}")
        grid = (int(parts[0]), int(parts[1]))
        if min(grid) < 1 or self.size_ids(grid) != size.tolist():
            raise ImageFormatError(f"an emu3 image size must read 'h*w' with h, w >= 1, got {text!r}")
        return grid


class ChameleonFormat(DelimitedFormat):
    """`<racm3:break> (h * w codes) <eoss>`: the grid is not in the tokens, it is the layout's (32x32)."""

    name = "chameleon"
    required_markers = tuple(CHAMELEON_MARKERS)

    def check_grid(self, grid: Grid, where: str) -> None:
        super().check_grid(grid, where)
        if tuple(grid) != self.default_grid:
            raise ImageFormatError(f"{where}: grid {grid[0]}x{grid[1]}, the {self.name} format holds only the "
                                   f"layout's {self.default_grid[0]}x{self.default_grid[1]}")

    def _structure(self, rows: np.ndarray, grid: Grid) -> np.ndarray:
        return np.concatenate([[self.start], np.asarray(rows, dtype=np.int64).reshape(-1), [self.end]])

    def _read_grid(self, ids: np.ndarray) -> Grid:
        return self.default_grid


class LiquidFormat(ChameleonFormat):
    """`<boi> (h * w codes) <eoi>`: Chameleon's structure with Liquid's markers; the grid is the layout's."""

    name = "liquid"
    required_markers = tuple(LIQUID_MARKERS)


class LuminaFormat(DelimitedFormat):
    """`<racm3:break> <grid h/2> <grid w/2> (w codes <reserved08799>) x h <eoss>` (Lumina-mGPT's FlexAR).

    The grid tokens count 32-pixel patches, two latent rows (or columns) each: the `grid_N` markers
    (`<reserved{8800 + N}>`) stand for N patches, so a latent grid must be even in both directions.
    """

    name = "lumina"
    required_markers = tuple(LUMINA_MARKERS)
    inner_markers = ("end_of_line",)

    @classmethod
    def validate(cls, layout) -> None:
        super().validate(layout)
        h, w = layout.image_grid
        missing = [LUMINA_GRID_ROLE.format(n // 2) for n in (h, w)
                   if n % 2 or LUMINA_GRID_ROLE.format(n // 2) not in layout.image_markers]
        if missing:
            _fail(f"the lumina image format needs an even image_grid with image_markers {missing}")

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.eol = layout.image_markers["end_of_line"]
        prefix = LUMINA_GRID_ROLE.format("")
        self.grid_id = {int(k[len(prefix):]): v for k, v in layout.image_markers.items() if k.startswith(prefix)}
        self.grid_of = {v: k for k, v in self.grid_id.items()}
        self.inner = self.inner + list(self.grid_of)

    def check_grid(self, grid: Grid, where: str) -> None:
        super().check_grid(grid, where)
        if grid[0] % 2 or grid[1] % 2 or grid[0] // 2 not in self.grid_id or grid[1] // 2 not in self.grid_id:
            raise ImageFormatError(f"{where}: grid {grid[0]}x{grid[1]}, the lumina format needs even sides of at "
                                   f"most {2 * max(self.grid_id)} (grid tokens count 2 latent rows each)")

    def _structure(self, rows: np.ndarray, grid: Grid) -> np.ndarray:
        h, _ = grid
        body = np.concatenate([rows, np.full((h, 1), self.eol, dtype=np.int64)], axis=1).reshape(-1)
        sizes = [self.grid_id[grid[0] // 2], self.grid_id[grid[1] // 2]]
        return np.concatenate([[self.start], sizes, body, [self.end]]).astype(np.int64)

    def _read_grid(self, ids: np.ndarray) -> Grid:
        if ids.size < 4 or int(ids[1]) not in self.grid_of or int(ids[2]) not in self.grid_of:
            raise ImageFormatError("a lumina image opens with two grid tokens (height, width) after its "
                                   "begin-image token")
        return 2 * self.grid_of[int(ids[1])], 2 * self.grid_of[int(ids[2])]


def _fail(msg: str) -> None:
    from megatron_jam.data.vocab import VocabLayoutError

    raise VocabLayoutError(f"native VocabLayout: {msg}")


FORMATS: Dict[str, Type[ImageFormat]] = {"ours": OursFormat, "emu3": Emu3Format, "chameleon": ChameleonFormat,
                                         "lumina": LuminaFormat, "liquid": LiquidFormat}

def image_format(layout) -> ImageFormat:
    """The format instance of `layout` (cached on the layout object)."""
    cached = layout.__dict__.get("_image_format")
    if cached is None:
        cached = FORMATS[layout.image_format](layout)
        layout.__dict__["_image_format"] = cached
    return cached
