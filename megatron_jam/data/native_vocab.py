"""Native vocabulary layouts: the fused model keeps the image parent's own ids (`VocabLayout(kind="native")`).

Why: a public image-generating parent such as Emu3 already holds its image
codes and image markers inside its own vocabulary (Emu3: code c at
151,854 + c, `<|image start|>`, end-of-line `<|extra_200|>`, ...). Re-indexing
them into our contiguous scheme would give every trained embedding and output
row a new meaning; a native layout instead records where each role lives.

This module holds the rules a native layout must obey (`validate_native`,
called by `VocabLayout.__post_init__`), its id -> kind table, the choice of
constructor by image format (`native_layout`, `detect_native_format`; the
Chameleon family's is `megatron_jam.data.chameleon_vocab.chameleon_layout`)
and the constructor for Emu3 from a tokenizer folder (`emu3_layout`), where
every id is looked up by its token string in `tokenizer.json`:

- image codes: the `<|visual token NNNNNN|>` tokens (code = NNNNNN, transformers'
  `Emu3ImageVocabularyMapping` rule), stored as an offset when contiguous, else
  as an explicit code -> id map;
- markers (`megatron_jam.data.image_format.EMU3_MARKERS`): `<|image start|>`
  (also plays `<break>`: it opens an image), `<|image token|>` (ends the size
  text), `<|extra_200|>` end of line, `<|extra_201|>` end of frame, `<|image end|>`;
- `<eos>`: the tokenizer's eos (`tokenizer_config.json`, Emu3: `<|extra_204|>`);
- `<mask>`, `<eos_span>` and the CM3 sentinels: with `specials="reserved"` the
  parent's unused reserved tokens `<|extra_0|>`, `<|extra_1|>`, ... (sentinels
  first, then `<eos_span>`, then `<mask>`), so the vocabulary keeps the
  parent's size; with `specials="appended"` new rows after the parent's last id;
- text: every id that is not one of the tokenizer's special added tokens.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_jam.data.vocab import (_IMAGE, _MARKER, _OTHER, _SPECIAL, _TEXT, DEFAULT_NUM_SENTINELS, NATIVE,
                                     NATIVE_LAYOUT_VERSION, VocabLayout, VocabLayoutError)
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

ROLE_NAMES = ("<break>", "<eos>", "<mask>", "<eos_span>")
SPECIALS_MODES = ("reserved", "appended")
EMU3_VISUAL_PREFIX = "<|visual token "
EMU3_RESERVED = "<|extra_{}|>"
EMU3_DEFAULT_GRID = (90, 90)
"""Emu3's default generation grid: 720 x 720 pixels (`image_area` 518,400) at 8x downsampling."""
SIZE_CHARACTERS = tuple("0123456789*")


def role_names(num_sentinels: int) -> List[str]:
    """Names a native layout's `special_ids` must hold, in assignment order of reserved tokens."""
    return list(ROLE_NAMES) + [f"<sentinel:{i}>" for i in range(num_sentinels)]


# ----------------------------------------------------------------------------- rules
def validate_native(layout: VocabLayout) -> None:
    """Raise VocabLayoutError when a native layout's fields disagree with each other (one line, naming the field)."""
    from megatron_jam.data.image_format import FORMATS

    def fail(msg: str) -> None:
        raise VocabLayoutError(f"native VocabLayout: {msg}")

    if layout.version != NATIVE_LAYOUT_VERSION:
        fail(f"version must be {NATIVE_LAYOUT_VERSION}, got {layout.version}")
    if layout.image_format not in FORMATS:
        fail(f"image_format {layout.image_format!r} is not one of {sorted(FORMATS)}")
    for name in ("text_vocab_size", "codebook_size", "tokens_per_image", "parent_vocab_size"):
        value = getattr(layout, name)
        if not isinstance(value, int) or value <= 0:
            fail(f"{name} must be a positive int, got {value!r}")
    if not isinstance(layout.num_sentinels, int) or layout.num_sentinels < 0:
        fail(f"num_sentinels must be >= 0, got {layout.num_sentinels!r}")
    if (layout.image_code_offset >= 0) == bool(layout.image_code_ids):
        fail("give exactly one of image_code_offset (contiguous codes) and image_code_ids (explicit map)")
    codes = (np.arange(layout.codebook_size) + layout.image_code_offset if layout.image_code_offset >= 0
             else np.asarray(layout.image_code_ids, dtype=np.int64))
    if codes.size != layout.codebook_size or np.unique(codes).size != codes.size:
        fail(f"image_code_ids must hold {layout.codebook_size} distinct ids, got {codes.size}")
    if codes.min() < 0 or codes.max() >= layout.parent_vocab_size:
        fail(f"image code ids must lie in the parent vocabulary [0, {layout.parent_vocab_size})")
    expected = set(role_names(layout.num_sentinels))
    if set(layout.special_ids) != expected:
        fail(f"special_ids must name exactly {sorted(expected - set(layout.special_ids)) or ''} "
             f"{sorted(set(layout.special_ids) - expected) or ''} (missing / unknown)")
    ids = list(layout.special_ids.values())
    if len(set(ids)) != len(ids):
        fail("two special tokens share an id")
    appended = sorted(i for i in ids if i >= layout.parent_vocab_size)
    if appended != list(range(layout.parent_vocab_size, layout.parent_vocab_size + len(appended))):
        fail(f"appended special ids must follow the parent vocabulary contiguously from {layout.parent_vocab_size}")
    structural = set(ids) | set(layout.image_markers.values())
    if min(structural) < 0 or structural & set(codes.tolist()):
        fail("a special token or image marker is an image code (or negative)")
    if any(a < b and (a < 0 or b > layout.parent_vocab_size) for a, b in layout.text_ranges) or not all(
            a < b for a, b in layout.text_ranges):
        fail(f"text_ranges must be non-empty half-open ranges inside [0, {layout.parent_vocab_size})")
    in_text = [i for i in structural | set(codes.tolist())
               if any(a <= i < b for a, b in layout.text_ranges)]
    if in_text:
        fail(f"id {in_text[0]} is both text (text_ranges) and a special, marker or image code")
    if layout.text_eos_id is not None and layout.text_eos_id != layout.special_ids["<eos>"]:
        fail(f"text_eos_id {layout.text_eos_id} must be None or <eos> ({layout.special_ids['<eos>']})")
    if layout.image_grid and (len(layout.image_grid) != 2 or min(layout.image_grid) < 1
                              or layout.image_grid[0] * layout.image_grid[1] != layout.tokens_per_image):
        fail(f"image_grid {list(layout.image_grid)} must be (h, w) with h * w = tokens_per_image "
             f"{layout.tokens_per_image}")
    FORMATS[layout.image_format].validate(layout)
    if layout.image_parent_rows:
        from megatron_jam.data.mixed_vocab import validate_mixed

        validate_mixed(layout)


def kind_table(layout: VocabLayout) -> np.ndarray:
    """id -> kind over [0, vocab_size): text, special (a reused text eos excepted, as in appended layouts),
    image code or image marker."""
    table = np.full(layout.vocab_size, _OTHER, dtype=np.int8)
    for a, b in layout.text_ranges:
        table[a:b] = _TEXT
    table[layout._code_ids] = _IMAGE
    table[list(layout.image_markers.values())] = _MARKER
    specials = [v for k, v in layout.special_ids.items() if not (k == "<eos>" and layout.text_eos_id is not None)]
    table[specials] = _SPECIAL
    return table


def ranges_of(ids: Iterable[int]) -> Tuple[Tuple[int, int], ...]:
    """Sorted ids -> maximal half-open ranges."""
    out: List[List[int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


# ----------------------------------------------------------------------------- which parent
NATIVE_FORMATS = ("emu3", "chameleon", "lumina", "liquid")
"""Image parents with a native layout constructor (`native_layout`), by their image format."""


def native_layout(model_path: str, image_format: Optional[str] = None, **kwargs) -> VocabLayout:
    """The native layout of the image parent at `model_path`, by `image_format` (None: `detect_native_format`).

    kwargs: as `emu3_layout` / `chameleon_vocab.chameleon_layout` (num_sentinels, image_grid, specials,
    parent_vocab_size, image_tokenizer, first_reserved).
    """
    fmt = image_format or detect_native_format(model_path)
    if fmt == "emu3":
        return emu3_layout(model_path, **kwargs)
    if fmt in ("chameleon", "lumina"):
        from megatron_jam.data.chameleon_vocab import chameleon_layout

        return chameleon_layout(model_path, image_format=fmt, **kwargs)
    if fmt == "liquid":
        from megatron_jam.data.liquid_vocab import liquid_layout

        return liquid_layout(model_path, **{k: v for k, v in kwargs.items() if k != "max_grid"})
    raise VocabLayoutError(f"native image format {fmt!r}: expected one of {', '.join(NATIVE_FORMATS)}")


def detect_native_format(model_path: str) -> str:
    """The image format of a parent folder: config.json's model_type ("emu3"; "chameleon", which is "lumina"
    when an architecture is Lumina-mGPT's `ChameleonXLLMX...`), else the tokenizer's begin-image token.

    Why the architecture: Lumina-mGPT's config subclasses ChameleonConfig, so model_type alone cannot tell it
    from Chameleon; a converted copy without that name needs image_format="lumina" (`--native-format`).
    """
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise VocabLayoutError(f"{config}: cannot read model_type ({e})") from e
        kind = data.get("model_type") if isinstance(data, dict) else None
        if kind == "emu3":
            return "emu3"
        if kind == "chameleon":
            return "lumina" if any("XLLMX" in a for a in data.get("architectures") or []) else "chameleon"
    from megatron_jam.data.text_tokenizer import HuggingFaceTextTokenizer

    text = HuggingFaceTextTokenizer(model_path)
    for token, fmt in (("<|image start|>", "emu3"), ("<racm3:break>", "chameleon"), ("<boi>", "liquid")):
        if text.tok.token_to_id(token) is not None:
            return fmt
    raise VocabLayoutError(f"{text.file}: neither Emu3's <|image start|>, Chameleon's <racm3:break> nor Liquid's "
                           f"<boi>: not a known image parent (native formats: {', '.join(NATIVE_FORMATS)})")


# ----------------------------------------------------------------------------- Emu3
def emu3_layout(tokenizer_path: str, *, num_sentinels: int = DEFAULT_NUM_SENTINELS,
                image_grid: Optional[Sequence[int]] = EMU3_DEFAULT_GRID, specials: str = "reserved",
                parent_vocab_size: Optional[int] = None, image_tokenizer: str = "",
                first_reserved: int = 0) -> VocabLayout:
    """The native layout of an Emu3 parent from its tokenizer (a folder with tokenizer.json, or the file).

    Args:
        tokenizer_path: `--tokenizer-model`: Emu3's tokenizer folder (tokenizer.json, tokenizer_config.json).
        num_sentinels: CM3 sentinels.
        image_grid: default latent grid (h, w) of generated images; tokens_per_image = h * w (None: 90x90).
        specials: "reserved" (`<|extra_N|>` tokens from `first_reserved` on) or "appended" (new rows).
        parent_vocab_size: the parent's embedding rows (default: `text_config.vocab_size` of a config.json in
            the same folder, else the tokenizer's size).
        image_tokenizer: identity of the VQ model, if known.
    """
    from megatron_jam.data.image_format import EMU3_MARKERS
    from megatron_jam.data.text_tokenizer import HuggingFaceTextTokenizer

    if specials not in SPECIALS_MODES:
        raise VocabLayoutError(f"specials={specials!r}: expected one of {', '.join(SPECIALS_MODES)}")
    text = HuggingFaceTextTokenizer(tokenizer_path)
    vocab = text.tok.get_vocab(with_added_tokens=True)
    where = text.file

    def lookup(token: str, what: str) -> int:
        if token not in vocab:
            raise VocabLayoutError(f"{where}: no token {token!r} ({what}); is this an Emu3 tokenizer?")
        return int(vocab[token])

    markers = {role: lookup(token, role) for role, token in EMU3_MARKERS.items()}
    code_ids = _visual_tokens(vocab, where)
    parent = int(parent_vocab_size or _config_vocab_size(os.path.dirname(os.path.abspath(where))) or text.vocab_size)
    if parent < text.vocab_size:
        raise VocabLayoutError(f"parent_vocab_size {parent} is smaller than {where}'s {text.vocab_size} ids")
    roles = _assign_specials(vocab, text.eos_id, markers, num_sentinels, specials, parent, first_reserved, where)
    added = {int(i) for i, tok in text.tok.get_added_tokens_decoder().items() if tok.special}
    non_text = added | set(code_ids) | set(markers.values()) | set(roles.values())
    text_ranges = ranges_of(i for i in range(text.vocab_size) if i not in non_text)
    h, w = (int(x) for x in (image_grid or EMU3_DEFAULT_GRID))
    layout = VocabLayout(
        text_vocab_size=text.vocab_size, codebook_size=len(code_ids), tokens_per_image=h * w,
        num_sentinels=num_sentinels, text_eos_id=roles["<eos>"] if roles["<eos>"] == text.eos_id else None,
        text_tokenizer=text.identity, image_tokenizer=image_tokenizer, version=NATIVE_LAYOUT_VERSION, kind=NATIVE,
        image_format="emu3", parent_vocab_size=parent, text_ranges=text_ranges,
        image_code_offset=code_ids[0] if code_ids == list(range(code_ids[0], code_ids[0] + len(code_ids))) else -1,
        image_code_ids=() if code_ids == list(range(code_ids[0], code_ids[0] + len(code_ids))) else tuple(code_ids),
        image_grid=(h, w), special_ids=roles, image_markers=markers,
        size_digit_ids=_size_digits(text, vocab, where))
    logger.info("Emu3 native layout from %s: %d ids (%d appended), codes at %d.., %s specials, grid %dx%d",
                where, layout.vocab_size, len(layout.appended_specials), layout.image_offset, specials, h, w)
    return layout


def _config_vocab_size(folder: str) -> Optional[int]:
    """`text_config.vocab_size` of an Emu3 `config.json` next to the tokenizer (a model folder), if any."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            size = (json.load(f).get("text_config") or {}).get("vocab_size")
    except (OSError, ValueError, AttributeError) as e:
        raise VocabLayoutError(f"{path}: cannot read text_config.vocab_size ({e})") from e
    return int(size) if size else None


def _visual_tokens(vocab: Dict[str, int], where: str) -> List[int]:
    """code -> id of Emu3's `<|visual token NNNNNN|>` tokens (codes must be 0..K-1)."""
    found = {int(name[-8:-2]): int(i) for name, i in vocab.items() if name.startswith(EMU3_VISUAL_PREFIX)}
    if not found:
        raise VocabLayoutError(f"{where}: no {EMU3_VISUAL_PREFIX}NNNNNN|> tokens (image codes); is this an Emu3 "
                               "tokenizer?")
    if sorted(found) != list(range(len(found))):
        raise VocabLayoutError(f"{where}: visual token codes are not 0..{len(found) - 1}")
    return [found[c] for c in range(len(found))]


def _assign_specials(vocab: Dict[str, int], eos: Optional[int], markers: Dict[str, int], num_sentinels: int,
                     specials: str, parent: int, first_reserved: int, where: str, template: str = EMU3_RESERVED,
                     avoid: Iterable[int] = ()) -> Dict[str, int]:
    """Role -> id: `<break>` is the begin-image marker, `<eos>` the tokenizer's eos; the rest on the reserved
    tokens `template.format(first_reserved)`, ... (none of them a marker or in `avoid`) or appended."""
    roles = {"<break>": markers["image_start"]}
    if eos is not None:
        roles["<eos>"] = eos
    todo = [name for name in ["<eos>"] + [f"<sentinel:{i}>" for i in range(num_sentinels)] + ["<eos_span>", "<mask>"]
            if name not in roles]
    if specials == "appended":
        return roles | {name: parent + k for k, name in enumerate(todo)}
    taken = set(markers.values()) | set(roles.values()) | set(avoid)
    k = first_reserved
    for name in todo:
        token = template.format(k)
        if token not in vocab:
            raise VocabLayoutError(f"{where}: reserved token {token!r} for {name} does not exist; use "
                                   f"fewer sentinels or --native-specials appended")
        if vocab[token] in taken:
            raise VocabLayoutError(f"{where}: reserved token {token!r} for {name} is already used by the parent")
        roles[name] = int(vocab[token])
        k += 1
    return roles


def _size_digits(text, vocab: Dict[str, int], where: str) -> Dict[str, int]:
    """Ids of "0".."9" and "*", checked to be how the tokenizer writes a grid size (one id per character)."""
    digits = {}
    for ch in SIZE_CHARACTERS:
        ids = text.encode(ch)
        if len(ids) != 1:
            raise VocabLayoutError(f"{where}: {ch!r} is not one token, so a grid size cannot be written digit by "
                                   "digit")
        digits[ch] = int(ids[0])
    for probe in ("90*90", "1234*5678", "7*64"):
        if text.encode(probe) != [digits[c] for c in probe]:
            raise VocabLayoutError(f"{where}: {probe!r} is not tokenized digit by digit (the Emu3 format writes "
                                   "the grid size one character per token, as Qwen's tokenizer does)")
    return digits

