"""Native vocabulary layouts of the Chameleon family: Chameleon 7B/30B, Anole 7B, Lumina-mGPT 7B/34B.

Why a module of its own: these parents keep their 8,192 image codes inside
their 65,536-token BPE vocabulary, as tokens named ``IMGIMG<letters>Z`` (ids
4..8195 in the released models) in no code order, and wrap an image in
markers that are ordinary reserved tokens of that vocabulary. A native layout
(`VocabLayout(kind="native")`, `megatron_jam.data.native_vocab`) keeps every
one of those ids, so each trained embedding and output row keeps its meaning.

Every id is looked up by its token string (never by arithmetic on ids):

- image codes: transformers' `ChameleonImageVocabularyMapping.bpe2img`
  (`models/chameleon/modeling_chameleon.py`; Meta's `VocabTranslation` in
  `chameleon/inference/vocab.py` is the same rule): the tokens whose name
  starts with ``IMGIMG``, code = int of the name between ``IMGIMG`` and the
  last character with the letters ``A``..``J`` read as digits 0..9
  (``IMGIMGBAZ`` -> 10). The names come from the ``vocabulary_map`` of the
  model's ``config.json`` (what transformers maps with) when present, else
  from ``tokenizer.json``; when both exist they must agree. Stored as an
  explicit code -> id map (`image_code_ids`), or an offset when contiguous;
- markers (`megatron_jam.data.image_format`): begin-image ``<racm3:break>``
  (8197; also our `<break>`) and end-of-image ``<eoss>`` (8196), the names of
  transformers' `ChameleonProcessor` (``image_start_token`` / ``image_end_token``)
  and of Meta's `VocabInfo` (``begin_image`` / ``end_image``); Lumina-mGPT
  adds the end-of-line token ``<reserved08799>`` (8803) and the grid tokens
  ``<reserved{8800 + n:05d}>`` (8804 + n) as markers ``grid_1``, ``grid_2``, ...
  (`FlexARItemProcessor` in Alpha-VLLM/Lumina-mGPT `lumina_mgpt/data/item_processor.py`);
- `<eos>`: the tokenizer's eos (``tokenizer_config.json``: ``</s>``, id 2);
- `<mask>`, `<eos_span>` and the CM3 sentinels: with `specials="reserved"`,
  the reserved tokens ``<reserved08900>``, ``<reserved08901>``, ... (sentinels
  first, then `<eos_span>`, then `<mask>`: 34 tokens for 32 sentinels, ids
  8904..8937 in the release). Why from 08900: the family already uses
  ``<reserved08706>`` (end of turn, transformers' ``sep_token_id`` 8710),
  ``<reserved08707>`` (renamed ``<image>``, 8711, transformers' placeholder),
  ``<reserved08796>``..``<reserved08799>`` and the grid tokens
  ``<reserved08800>``..``<reserved08864>`` (Lumina-mGPT up to 1024 px and
  aspect ratio 4); 08900..08999 is used by none of them (a video fork of
  Lumina-mGPT takes 09000/09001). `first_reserved` moves the block; with
  `specials="appended"` they are new rows after the parent's 65,536;
- text: every other id except the tokenizer's special added tokens, the
  ``<reservedNNNNN>`` tokens and transformers' ``<image>`` placeholder.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence

from megatron_jam.data.vocab import DEFAULT_NUM_SENTINELS, NATIVE, NATIVE_LAYOUT_VERSION, VocabLayout, \
    VocabLayoutError
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

CHAMELEON_FORMATS = ("chameleon", "lumina")
IMAGE_PREFIX = "IMGIMG"
"""Name prefix of Chameleon's image-code tokens (transformers' and Meta's rule)."""
CHAMELEON_RESERVED = "<reserved{:05d}>"
CHAMELEON_FIRST_RESERVED = 8900
"""First reserved token our specials take (`<reserved08900>`): clear of every reserved token the family uses."""
CHAMELEON_DEFAULT_GRID = (32, 32)
"""Chameleon's VQ at 512 px: 16x downsampling, 1,024 codes."""
LUMINA_MAX_GRID = 64
"""Grid tokens `grid_1` .. `grid_64` (32-pixel patches): Lumina-mGPT's 1024-px crops at aspect ratio 4 reach 64."""
RESERVED_NAME = re.compile(r"^<reserved\d+>$")
PLACEHOLDERS = ("<image>",)
"""transformers' conversion renames `<reserved08707>` to `<image>` (a placeholder the processor expands): not text."""


def chameleon_layout(model_path: str, *, image_format: str = "chameleon",
                     num_sentinels: int = DEFAULT_NUM_SENTINELS, image_grid: Optional[Sequence[int]] = None,
                     specials: str = "reserved", parent_vocab_size: Optional[int] = None, image_tokenizer: str = "",
                     first_reserved: int = CHAMELEON_FIRST_RESERVED, max_grid: int = LUMINA_MAX_GRID) -> VocabLayout:
    """The native layout of a Chameleon-family parent from its Hugging Face model folder.

    Args:
        model_path: the model folder (`tokenizer.json`, `tokenizer_config.json`, `config.json` with
            `vocabulary_map` and `vocab_size`), or a tokenizer.json file (a config.json next to it is used).
        image_format: "chameleon" (Chameleon, Anole) or "lumina" (Lumina-mGPT).
        num_sentinels: CM3 sentinels.
        image_grid: latent grid (h, w); default 32x32 (512 px). The chameleon format holds only this grid;
            in the lumina format it is the default size of generated images (sides must be even).
        specials: "reserved" (`<reserved{first_reserved}>` on) or "appended" (new rows).
        parent_vocab_size: the parent's embedding rows (default: `vocab_size` of config.json, else the
            tokenizer's size).
        image_tokenizer: identity of the VQ model, if known.
        first_reserved: number of the first reserved token for our specials.
        max_grid: lumina: the largest grid token (`grid_N`, N patches of 32 px) recorded as a marker.
    """
    from megatron_jam.data.native_vocab import SPECIALS_MODES, _assign_specials, ranges_of
    from megatron_jam.data.text_tokenizer import HuggingFaceTextTokenizer

    if image_format not in CHAMELEON_FORMATS:
        raise VocabLayoutError(f"image_format={image_format!r}: expected one of {', '.join(CHAMELEON_FORMATS)}")
    if specials not in SPECIALS_MODES:
        raise VocabLayoutError(f"specials={specials!r}: expected one of {', '.join(SPECIALS_MODES)}")
    text = HuggingFaceTextTokenizer(model_path)
    vocab, where = text.tok.get_vocab(with_added_tokens=True), text.file
    config_path = os.path.join(os.path.dirname(os.path.abspath(where)), "config.json")
    config = read_config(config_path)
    code_ids = image_code_ids(config.get("vocabulary_map") or vocab,
                              f"{config_path} vocabulary_map" if config.get("vocabulary_map") else where)
    if config.get("vocabulary_map"):
        _check_agree(code_ids, vocab, where, config_path)
    markers = _markers(vocab, image_format, max_grid, where)
    parent = int(parent_vocab_size or config.get("vocab_size") or text.vocab_size)
    if parent < text.vocab_size:
        raise VocabLayoutError(f"parent_vocab_size {parent} is smaller than {where}'s {text.vocab_size} ids")
    eos = text.eos_id if text.eos_id is not None else vocab.get("</s>")
    avoid = [vocab[t] for t in PLACEHOLDERS + (CHAMELEON_RESERVED.format(8706),) if t in vocab]
    roles = _assign_specials(vocab, eos, markers, num_sentinels, specials, parent, first_reserved, where,
                             template=CHAMELEON_RESERVED, avoid=avoid)
    non_text = _non_text(text, vocab) | set(code_ids) | set(markers.values()) | set(roles.values())
    h, w = (int(x) for x in (image_grid or CHAMELEON_DEFAULT_GRID))
    contiguous = code_ids == list(range(code_ids[0], code_ids[0] + len(code_ids)))
    layout = VocabLayout(
        text_vocab_size=text.vocab_size, codebook_size=len(code_ids), tokens_per_image=h * w,
        num_sentinels=num_sentinels, text_eos_id=roles["<eos>"] if roles["<eos>"] == text.eos_id else None,
        text_tokenizer=text.identity, image_tokenizer=image_tokenizer, version=NATIVE_LAYOUT_VERSION, kind=NATIVE,
        image_format=image_format, parent_vocab_size=parent,
        text_ranges=ranges_of(i for i in range(text.vocab_size) if i not in non_text),
        image_code_offset=code_ids[0] if contiguous else -1, image_code_ids=() if contiguous else tuple(code_ids),
        image_grid=(h, w), special_ids=roles, image_markers=markers)
    logger.info("%s native layout from %s: %d ids (%d appended), %d codes (ids %d..%d), %s specials, grid %dx%d",
                image_format, where, layout.vocab_size, len(layout.appended_specials), len(code_ids), min(code_ids),
                max(code_ids), specials, h, w)
    return layout


def read_config(path: str) -> dict:
    """The model's config.json as a dict ({} when there is none)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise VocabLayoutError(f"{path}: cannot read ({e})") from e
    if not isinstance(config, dict) or not isinstance(config.get("vocabulary_map") or {}, dict):
        raise VocabLayoutError(f"{path}: expected a JSON object whose vocabulary_map is an object")
    return config


def code_of_name(name: str) -> int:
    """transformers' `ChameleonImageVocabularyMapping.bpe2img` rule: `IMGIMG` + letters + one last character,
    letters A..J read as digits 0..9 (other characters kept as they are)."""
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    return int("".join(digits.get(c, c) for c in name[len(IMAGE_PREFIX):-1]))


def image_code_ids(vocabulary_map: Dict[str, int], where: str) -> List[int]:
    """code -> id of the `IMGIMG...` tokens of a vocabulary map (codes must be exactly 0..K-1)."""
    val2name = {int(v): k for k, v in vocabulary_map.items()}  # as transformers: a later name wins an id
    found: Dict[int, int] = {}
    for tok in sorted(int(v) for k, v in vocabulary_map.items() if k.startswith(IMAGE_PREFIX)):
        try:
            code = code_of_name(val2name[tok])
        except ValueError as e:
            raise VocabLayoutError(f"{where}: image token {val2name[tok]!r} does not name a code ({e})") from e
        if code in found:
            raise VocabLayoutError(f"{where}: image code {code} is named twice (ids {found[code]} and {tok})")
        found[code] = tok
    if not found:
        raise VocabLayoutError(f"{where}: no {IMAGE_PREFIX}...Z tokens (image codes); is this a Chameleon tokenizer?")
    if sorted(found) != list(range(len(found))):
        raise VocabLayoutError(f"{where}: image codes are not 0..{len(found) - 1}")
    return [found[c] for c in range(len(found))]


def _check_agree(code_ids: List[int], vocab: Dict[str, int], where: str, config_path: str) -> None:
    """config.json's vocabulary_map (what transformers maps codes with) and tokenizer.json must name the same
    image tokens, or the text side and the image side would disagree on an id."""
    from_tokenizer = image_code_ids(vocab, where)
    if from_tokenizer != code_ids:
        bad = next((c for c, (a, b) in enumerate(zip(code_ids, from_tokenizer)) if a != b),
                   min(len(code_ids), len(from_tokenizer)))
        raise VocabLayoutError(f"{config_path}: vocabulary_map and {where} disagree on the image tokens "
                               f"(first at code {bad}): not this model's tokenizer")


def _markers(vocab: Dict[str, int], image_format: str, max_grid: int, where: str) -> Dict[str, int]:
    """Role -> id of the format's markers (lumina: with its grid tokens `grid_1` .. `grid_{max_grid}`)."""
    from megatron_jam.data.image_format import (CHAMELEON_MARKERS, LUMINA_GRID_BASE, LUMINA_GRID_ROLE,
                                                LUMINA_GRID_TOKEN, LUMINA_MARKERS)

    table = dict(LUMINA_MARKERS if image_format == "lumina" else CHAMELEON_MARKERS)
    if image_format == "lumina":
        table |= {LUMINA_GRID_ROLE.format(n): LUMINA_GRID_TOKEN.format(LUMINA_GRID_BASE + n)
                  for n in range(1, max_grid + 1)}
    missing = [f"{token} ({role})" for role, token in table.items() if token not in vocab]
    if missing:
        raise VocabLayoutError(f"{where}: no token {missing[0]}; is this a {image_format} tokenizer?")
    return {role: int(vocab[token]) for role, token in table.items()}


def _non_text(text, vocab: Dict[str, int]) -> set:
    """Ids that are never text: special added tokens, `<reservedNNNNN>` tokens, placeholders, image tokens."""
    out = {int(i) for i, tok in text.tok.get_added_tokens_decoder().items() if tok.special}
    return out | {int(i) for name, i in vocab.items()
                  if RESERVED_NAME.match(name) or name in PLACEHOLDERS or name.startswith(IMAGE_PREFIX)}
