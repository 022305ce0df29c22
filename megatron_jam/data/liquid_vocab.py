"""Native vocabulary layout of Liquid (FoundationVision's Liquid-7B: Gemma-7B continued on image codes).

Why a module of its own: Liquid keeps Gemma's tokenizer whole and appends Chameleon's 8,192 VQGAN codes
after it (`liquid/expand_vocabulary.py`: `resize_token_embeddings(len(tokenizer) + 8192)`; generation
subtracts `len(tokenizer)` from sampled ids), so code c is id `len(tokenizer) + c`, with the added tokens
counted. An image is `<boi>`, 1,024 codes, `<eoi>` (`image_format.LiquidFormat`). A native layout keeps every
id, so each trained row keeps its meaning.

Ids are looked up by token string:

- image codes: contiguous from `len(tokenizer)` (the tokenizer's size with its added tokens), 8,192 of them;
  the parent's embedding rows (config.json `vocab_size`) must hold them;
- markers `<boi>` / `<eoi>`, which play `<break>`'s role and close the image;
- `<eos>`: the tokenizer's eos (Gemma: `<eos>`, id 1);
- `<mask>`, `<eos_span>` and the CM3 sentinels: with `specials="reserved"`, Gemma's unused tokens
  `<unused{first_reserved}>`, ... (none of them a marker or Liquid's `<unconditional>` / `<image>`); with
  `specials="appended"`, new rows after the parent's;
- text: every id below the codes except the tokenizer's special added tokens, the `<unusedN>` tokens, the
  markers and Liquid's `<unconditional>` and `<image>` placeholders.

Liquid's classifier-free guidance runs its unconditional row on `<unconditional><boi>`; our generator uses
the CM3 sentinel context it trains (docs/generation.md), which a model fused from Liquid learns the same way.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from megatron_jam.data.vocab import DEFAULT_NUM_SENTINELS, NATIVE, NATIVE_LAYOUT_VERSION, VocabLayout, \
    VocabLayoutError
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

LIQUID_CODEBOOK = 8192
"""Chameleon's VQGAN codebook, which Liquid appends."""
LIQUID_DEFAULT_GRID = (32, 32)
"""512 px through Chameleon's VQGAN (16x downsampling): 1,024 codes."""
LIQUID_RESERVED = "<unused{}>"
"""Gemma's reserved tokens (`<unused0>` ...), where our specials go with `specials="reserved"`."""
LIQUID_PLACEHOLDERS = ("<unconditional>", "<image>")
"""Liquid's guidance context and its image placeholder (understanding tasks): never text, never our specials."""
UNUSED_NAME = re.compile(r"^<unused\d+>$")


def liquid_layout(model_path: str, *, num_sentinels: int = DEFAULT_NUM_SENTINELS,
                  image_grid: Optional[Sequence[int]] = None, specials: str = "reserved",
                  parent_vocab_size: Optional[int] = None, image_tokenizer: str = "",
                  first_reserved: int = 0) -> VocabLayout:
    """The native layout of a Liquid parent from its Hugging Face folder (tokenizer.json, tokenizer_config.json,
    config.json with `vocab_size`), or a tokenizer.json file (a config.json next to it is used).

    Args: as `chameleon_vocab.chameleon_layout` (the grid must be 32x32 unless given: Liquid generates
    1,024 codes); `first_reserved` numbers the first `<unusedN>` token our specials take.
    """
    import os

    from megatron_jam.data.chameleon_vocab import read_config
    from megatron_jam.data.image_format import LIQUID_MARKERS
    from megatron_jam.data.native_vocab import SPECIALS_MODES, _assign_specials, ranges_of
    from megatron_jam.data.text_tokenizer import HuggingFaceTextTokenizer

    if specials not in SPECIALS_MODES:
        raise VocabLayoutError(f"specials={specials!r}: expected one of {', '.join(SPECIALS_MODES)}")
    text = HuggingFaceTextTokenizer(model_path)
    vocab, where = text.tok.get_vocab(with_added_tokens=True), text.file
    config_path = os.path.join(os.path.dirname(os.path.abspath(where)), "config.json")
    offset = text.vocab_size  # len(tokenizer): Liquid's first code
    parent = int(parent_vocab_size or read_config(config_path).get("vocab_size") or offset + LIQUID_CODEBOOK)
    if parent < offset + LIQUID_CODEBOOK:
        raise VocabLayoutError(f"{config_path}: vocab_size {parent} cannot hold Liquid's {LIQUID_CODEBOOK} codes "
                               f"after the tokenizer's {offset} ids; is this a Liquid model?")
    missing = [token for token in LIQUID_MARKERS.values() if token not in vocab]
    if missing:
        raise VocabLayoutError(f"{where}: no token {missing[0]}; is this Liquid's tokenizer?")
    markers = {role: int(vocab[token]) for role, token in LIQUID_MARKERS.items()}
    avoid = [vocab[t] for t in LIQUID_PLACEHOLDERS if t in vocab]
    roles = _assign_specials(vocab, text.eos_id, markers, num_sentinels, specials, parent, first_reserved, where,
                             template=LIQUID_RESERVED, avoid=avoid)
    special_added = {int(i) for i, tok in text.tok.get_added_tokens_decoder().items() if tok.special}
    non_text = (special_added | set(markers.values()) | set(roles.values()) | set(avoid)
                | {int(i) for name, i in vocab.items() if UNUSED_NAME.match(name)})
    h, w = (int(x) for x in (image_grid or LIQUID_DEFAULT_GRID))
    layout = VocabLayout(
        text_vocab_size=offset, codebook_size=LIQUID_CODEBOOK, tokens_per_image=h * w, num_sentinels=num_sentinels,
        text_eos_id=roles["<eos>"] if roles.get("<eos>") == text.eos_id else None,
        text_tokenizer=text.identity, image_tokenizer=image_tokenizer, version=NATIVE_LAYOUT_VERSION, kind=NATIVE,
        image_format="liquid", parent_vocab_size=parent,
        text_ranges=ranges_of(i for i in range(offset) if i not in non_text),
        image_code_offset=offset, image_grid=(h, w), special_ids=roles, image_markers=markers)
    logger.info("liquid native layout from %s: %d ids (%d appended), codes %d..%d, %s specials, grid %dx%d",
                where, layout.vocab_size, len(layout.appended_specials), offset, offset + LIQUID_CODEBOOK - 1,
                specials, h, w)
    return layout
