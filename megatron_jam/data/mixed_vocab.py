"""Mixed vocabulary layouts: the LLM's tokenizer for text, the image parent's image part re-indexed after it.

Why: parents with the same layer shapes but different tokenizers (Llama-3-8B +
Emu3-Gen) can only be fused by JAM-Cross. Eq. 1 averages and eq. 2 stacks
embedding rows id by id, and row i is a different token in each parent. JAM-Cross
keeps both stacks, so one shared table can hold the LLM's rows for text and the
image parent's rows for images, each stream then computing its parent at step 0
on its own tokens (the text stream on text ids, the image stream on image tokens).

A mixed layout is a native layout (JSON version 2, `megatron_jam.data.native_vocab`)
with `image_parent_rows` set::

    [0, T)    the LLM tokenizer's ids (T: its size with added tokens). Text = every id
              except its special added tokens; `<eos>` = its eos token
    [T, P)    the image parent's image part, in the image parent's id order: the size
              characters "0".."9" "*" of its tokenizer (Emu3 writes an image's grid as
              text), the reserved tokens our specials sit on (`specials="reserved"`),
              its image markers, then its image codes (contiguous when they were;
              a Chameleon parent's, ids 4..8195, come first and keep their code map)
    [P, V)    specials appended as new rows (`specials="appended"`)

`<break>` is the image parent's begin-image token (Emu3's `<|image start|>`,
Chameleon's `<racm3:break>`); `<mask>`, `<eos_span>` and the CM3 sentinels are
the image parent's reserved tokens (Emu3 `<|extra_N|>`, Chameleon
`<reservedNNNNN>`; re-indexed) or appended rows; `<eos>` is the LLM's eos (if
its tokenizer has none, the image parent's, re-indexed). `image_parent_rows` lists
(id, image-parent id, count) ranges over [T, P): the converter's row map
(`megatron_jam.convert.vocab`), and `image_parent_tokenizer` the image parent's
tokenizer identity, which the converter checks against its --img folder.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_jam.data.vocab import DEFAULT_NUM_SENTINELS, NATIVE, NATIVE_LAYOUT_VERSION, VocabLayout, \
    VocabLayoutError
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)


def mixed_layout(llm_tokenizer: str, image_parent: str, *, llm_tokenizer_type: Optional[str] = None,
                 num_sentinels: int = DEFAULT_NUM_SENTINELS, image_grid: Optional[Sequence[int]] = None,
                 specials: str = "reserved", image_tokenizer: str = "",
                 image_format: Optional[str] = None) -> VocabLayout:
    """The mixed layout of an LLM tokenizer and an image parent (Emu3, Chameleon, Lumina-mGPT).

    Args:
        llm_tokenizer: `--tokenizer-model`: the LLM's tokenizer (HF folder or tokenizer.json, or a .model file).
        image_parent: the image parent's model folder (tokenizer.json + config.json).
        num_sentinels, image_grid, specials, image_tokenizer: as `native_vocab.emu3_layout`.
        image_format: the image parent's format (None: `native_vocab.detect_native_format`).
    """
    from megatron_jam.data.native_vocab import native_layout
    from megatron_jam.data.text_tokenizer import load_text_tokenizer

    text = load_text_tokenizer(llm_tokenizer, llm_tokenizer_type)
    parent = native_layout(image_parent, image_format, num_sentinels=num_sentinels, image_grid=image_grid,
                           specials=specials, image_tokenizer=image_tokenizer)
    t = text.vocab_size
    use_parent_eos = text.eos_id is None
    roles = {k: v for k, v in parent.special_ids.items() if k != "<eos>" or use_parent_eos}
    sources = sorted(set(parent.size_digit_ids.values()) | set(parent.image_markers.values())
                     | set(parent._code_ids.tolist()) | {v for v in roles.values() if v < parent.parent_vocab_size})
    new_id = {pid: t + k for k, pid in enumerate(sources)}
    p = t + len(sources)
    appended = sorted((v, k) for k, v in roles.items() if v >= parent.parent_vocab_size)
    special_ids = {k: new_id[v] for k, v in roles.items() if v < parent.parent_vocab_size}
    special_ids |= {k: p + i for i, (_, k) in enumerate(appended)}
    if not use_parent_eos:
        special_ids["<eos>"] = int(text.eos_id)
    codes = [new_id[c] for c in parent._code_ids.tolist()]
    contiguous = codes == list(range(codes[0], codes[0] + len(codes)))
    layout = VocabLayout(
        text_vocab_size=t, codebook_size=parent.codebook_size, tokens_per_image=parent.tokens_per_image,
        num_sentinels=num_sentinels, text_eos_id=None if use_parent_eos else int(text.eos_id),
        text_tokenizer=text.identity, image_tokenizer=image_tokenizer, version=NATIVE_LAYOUT_VERSION, kind=NATIVE,
        image_format=parent.image_format, parent_vocab_size=p, text_ranges=_text_ranges(text),
        image_code_offset=codes[0] if contiguous else -1, image_code_ids=() if contiguous else tuple(codes),
        image_grid=parent.image_grid, special_ids=special_ids,
        image_markers={k: new_id[v] for k, v in parent.image_markers.items()},
        size_digit_ids={k: new_id[v] for k, v in parent.size_digit_ids.items()},
        image_parent_rows=_row_ranges(sources, t), image_parent_tokenizer=parent.text_tokenizer)
    logger.info("mixed layout: %d text ids of %s, image part [%d, %d) from %s (%d ranges), %d appended, codes at %d",
                t, llm_tokenizer, t, p, image_parent, len(layout.image_parent_rows), len(appended),
                layout.image_offset)
    return layout


def _text_ranges(text) -> Tuple[Tuple[int, int], ...]:
    """Ordinary text ids of the LLM tokenizer: all but its special (added or control) tokens and its eos."""
    from megatron_jam.data.native_vocab import ranges_of

    if hasattr(text, "tok"):  # Hugging Face
        special = {int(i) for i, tok in text.tok.get_added_tokens_decoder().items() if tok.special}
    else:  # sentencepiece
        special = {i for i in range(text.vocab_size) if text.sp.is_control(i) or text.sp.is_unknown(i)}
    if text.eos_id is not None:
        special.add(int(text.eos_id))
    return ranges_of(i for i in range(text.vocab_size) if i not in special)


def _row_ranges(sources: List[int], first: int) -> Tuple[Tuple[int, int, int], ...]:
    """(id, image-parent id, count) ranges of ids first, first + 1, ... taking the sorted `sources` rows."""
    out: List[List[int]] = []
    for k, pid in enumerate(sources):
        if out and out[-1][1] + out[-1][2] == pid:
            out[-1][2] += 1
        else:
            out.append([first + k, pid, 1])
    return tuple(tuple(r) for r in out)


def image_parent_ids(layout: VocabLayout, ids) -> np.ndarray:
    """Ids of the image part -> the image parent's own ids (int64); raises on an id outside the part."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.full(ids.shape, -1, dtype=np.int64)
    for a, src, n in layout.image_parent_rows:
        inside = (ids >= a) & (ids < a + n)
        out[inside] = ids[inside] - a + src
    if (out < 0).any():
        raise VocabLayoutError(f"id {int(ids[out < 0].flat[0])} is not in the image part "
                               f"[{layout.text_vocab_size}, {layout.parent_vocab_size}) of the mixed layout")
    return out


def validate_mixed(layout: VocabLayout) -> None:
    """Raise VocabLayoutError when a mixed layout's row map or roles disagree (called by `validate_native`)."""
    t, p = layout.text_vocab_size, layout.parent_vocab_size

    def fail(msg: str) -> None:
        raise VocabLayoutError(f"mixed VocabLayout: {msg}")

    pos, parent_ids = t, []
    for a, src, n in layout.image_parent_rows:
        if a != pos or n < 1 or src < 0:
            fail(f"image_parent_rows must tile [{t}, {p}) in order with counts >= 1 and ids >= 0, got "
                 f"({a}, {src}, {n}) at {pos}")
        pos += n
        parent_ids.extend(range(src, src + n))
    if pos != p:
        fail(f"image_parent_rows cover [{t}, {pos}) but the image part is [{t}, {p})")
    if len(set(parent_ids)) != len(parent_ids):
        fail("image_parent_rows name an image-parent row twice")
    if any(b > t for _, b in layout.text_ranges):
        fail(f"text_ranges must lie inside the LLM's ids [0, {t})")
    image_part = list(layout.image_markers.values()) + list(layout.size_digit_ids.values()) + [
        int(layout._code_ids.min()), int(layout._code_ids.max())]
    if min(image_part) < t or max(image_part) >= p:
        fail(f"image codes, markers and size characters must lie in the image part [{t}, {p})")
    llm_side = [k for k, v in layout.special_ids.items() if v < t and k != "<eos>"]
    if llm_side:
        fail(f"{llm_side[0]} is an LLM id; only <eos> (the LLM's eos) may be")
    if layout.special_ids["<eos>"] < t and layout.text_eos_id is None:
        fail("<eos> is an LLM id but text_eos_id is not set")

