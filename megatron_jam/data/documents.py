"""Interleaved documents <-> per-modality sequences (the CM3leon layout on disk).

Why: the CM3 dataset, the inspector and the generator must agree on exactly
where `<break>` and `<eos>` sit and which stored sequence is an image. This
module is the single definition.

A document is a list of items: text (sentencepiece ids), images (VQ codes,
exactly `tokens_per_image` of them in the default `ours` image format). Its token stream is::

    seg_0 [<break>] seg_1 [<break>] ... seg_n <eos>

- adjacent text items are concatenated into one text segment (each item is
  encoded separately, ids are joined; no separator is inserted);
- a `<break>` sits between two adjacent segments when at least one of them is
  an image (text|image, image|text and image|image), never at the start;
- `<eos>` ends every document (after an image too, with no `<break>`).

Storage (Megatron multimodal dataset, one document = one Megatron document):
every image is its own image-mode (1) sequence holding only its codes; every
maximal run of non-image tokens (text ids, `<break>`, `<eos>`) is one
text-mode (0) sequence. So `<break>` belongs to the text sequence next to the
image, and `<eos>` to the last text sequence, which may be `[<eos>]` alone.
Example: [text A, image X, text B] -> (A <break>)₀ (X)₁ (<break> B <eos>)₀.

Other image formats (`megatron_jam.data.image_format`, the layout's
`image_format`): the image-mode sequence holds the whole image structure the
format writes (Emu3: `<|image start|> h*w <|image token|> rows <eof>
<|image end|>`), and formats whose markers delimit images get no `<break>`:
[text A, image X, text B] -> (A)₀ (X)₁ (B <eos>)₀.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from megatron_jam.data.image_format import ImageFormatError
from megatron_jam.data.indexed_builder import MODE_IMAGE, MODE_TEXT, DocumentBatch
from megatron_jam.data.vocab import VocabLayout

TEXT, IMAGE, IMAGE_TOKENS = "text", "image", "image_tokens"
CONTENT_TYPES = (TEXT, IMAGE, IMAGE_TOKENS)


class RejectedDocument(Exception):
    """A document that cannot be stored; `reason` is a short stable code for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncodingFailure(RuntimeError):
    """An unexpected error while encoding an input line (not a bad document: a bug, a broken
    tokenizer); the one-line message names the file and line. Plain message only, so that it
    pickles from a worker process to the parent unchanged."""


@contextlib.contextmanager
def failure_names(path: str, line: int):
    """Turn any unexpected exception of the block into an EncodingFailure naming `path` and `line`
    (RejectedDocument, the expected kind, passes through for the caller to record)."""
    try:
        yield
    except (RejectedDocument, EncodingFailure):
        raise
    except Exception as e:
        raise EncodingFailure(f"{path} line {line}: {type(e).__name__}: {e}") from e


def encode_texts(tokenizer: Any, docs: Sequence[Tuple[int, List[str]]]) -> Dict[int, Any]:
    """key -> the token ids (int64 arrays) of each text of a document, or the RejectedDocument
    ("untokenizable_text") when the tokenizer refuses one of its texts (a lone surrogate such as
    "\\ud800" from a JSON escape: sentencepiece raises TypeError). One batched call for all
    documents; only when it fails, one call per document, so a bad document costs only itself."""
    try:
        flat = iter(tokenizer.encode_batch([t for _, texts in docs for t in texts]))
        return {key: [np.asarray(next(flat), dtype=np.int64) for _ in texts] for key, texts in docs}
    except Exception:
        pass
    out: Dict[int, Any] = {}
    for key, texts in docs:
        try:
            out[key] = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
        except Exception as e:  # whatever the tokenizer raises for input it cannot take
            out[key] = RejectedDocument("untokenizable_text", f"the text tokenizer refused it: {type(e).__name__}: "
                                                              f"{str(e)[:200]}")
    return out


def content_items(record: Any, json_keys: Sequence[str]) -> List[Tuple[str, Any]]:
    """(type, value) items of a parsed JSON record, interleaved or text-only.

    Interleaved records have a "content" list of one-key objects; text-only
    records contribute one text item per key of `json_keys` they contain.
    """
    if not isinstance(record, dict):
        raise RejectedDocument("malformed_json", f"expected a JSON object, got {type(record).__name__}")
    if "content" in record:
        content = record["content"]
        if not isinstance(content, list):
            raise RejectedDocument("malformed_json", '"content" must be a list')
        return [_content_item(item, i) for i, item in enumerate(content)]
    items = [(TEXT, record[k]) for k in json_keys if k in record]
    if not items:
        raise RejectedDocument("missing_text_key", f"no 'content' and none of the keys {list(json_keys)}")
    for _, value in items:
        if not isinstance(value, str):
            raise RejectedDocument("malformed_json", f"text must be a string, got {type(value).__name__}")
    return items


def _content_item(item: Any, index: int) -> Tuple[str, Any]:
    if not isinstance(item, dict) or len(item) != 1:
        raise RejectedDocument("unknown_content_type", f"content[{index}] must be an object with exactly one key")
    (kind, value), = item.items()
    if kind not in CONTENT_TYPES:
        raise RejectedDocument("unknown_content_type", f"content[{index}] has unknown type {kind!r}")
    if kind in (TEXT, IMAGE) and not isinstance(value, str):
        raise RejectedDocument("malformed_json", f"content[{index}].{kind} must be a string")
    if kind == IMAGE_TOKENS and not isinstance(value, list):
        raise RejectedDocument("malformed_json", f"content[{index}].image_tokens must be a list of ints")
    return kind, value


def image_codes_to_ids(codes: Any, layout: VocabLayout, index: int) -> np.ndarray:
    """Validated VQ codes of one image -> the ids stored for it (`layout.format`; `ours`: the code ids).

    `codes` is a flat list (the layout's default grid: exactly `tokens_per_image` codes) or a list of
    h rows of w codes (the grid is its shape; the `emu3` format writes it into the tokens).
    """
    try:
        arr = np.asarray(codes)
    except (ValueError, TypeError) as e:
        raise RejectedDocument("malformed_json", f"content[{index}].image_tokens: {e}") from e
    if arr.ndim not in (1, 2) or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise RejectedDocument("malformed_json", f"content[{index}].image_tokens must be a flat list of ints "
                               "or a list of equal-length rows of ints")
    if arr.ndim == 1 and arr.size != layout.tokens_per_image:
        raise RejectedDocument("image_tokens_length", f"content[{index}] has {arr.size} codes, "
                               f"the layout needs {layout.tokens_per_image} per image")
    if arr.size == 0:
        raise RejectedDocument("image_tokens_length", f"content[{index}] has no codes")
    if arr.min() < 0 or arr.max() >= layout.codebook_size:
        bad = arr[(arr < 0) | (arr >= layout.codebook_size)][0]
        raise RejectedDocument("token_out_of_range", f"content[{index}] code {int(bad)} is outside the "
                               f"codebook [0, {layout.codebook_size})")
    fmt = layout.format
    grid = fmt.default_grid if arr.ndim == 1 else (int(arr.shape[0]), int(arr.shape[1]))
    try:
        fmt.check_grid(grid, f"content[{index}]")
        return fmt.image_ids(arr.reshape(-1).astype(np.int64), grid)
    except ImageFormatError as e:
        raise RejectedDocument("image_tokens_length", str(e)) from e


def build_sequences(segments: Sequence[Tuple[str, np.ndarray]], layout: VocabLayout
                    ) -> Tuple[List[np.ndarray], List[int]]:
    """Segments [(TEXT|IMAGE, ids)] -> stored sequences and modes (see module docstring).

    Empty text segments are dropped; a document with nothing left is rejected.
    """
    merged: List[Tuple[str, np.ndarray]] = []
    for kind, ids in segments:
        if kind == TEXT and ids.size == 0:
            continue
        if kind == TEXT and merged and merged[-1][0] == TEXT:
            merged[-1] = (TEXT, np.concatenate([merged[-1][1], ids]))
        else:
            merged.append((kind, ids))
    if not merged:
        raise RejectedDocument("empty_document", "no text tokens and no images")
    brk, eos = np.array([layout.break_id]), np.array([layout.eos_id])
    uses_break = layout.format.uses_break
    sequences: List[np.ndarray] = []
    modes: List[int] = []
    run: List[np.ndarray] = []  # pending non-image tokens
    for i, (kind, ids) in enumerate(merged):
        if uses_break and i > 0 and (kind == IMAGE or merged[i - 1][0] == IMAGE):
            run.append(brk)
        if kind == IMAGE:
            if run:
                sequences.append(np.concatenate(run))
                modes.append(MODE_TEXT)
                run = []
            sequences.append(ids)
            modes.append(MODE_IMAGE)
        else:
            run.append(ids)
    run.append(eos)
    sequences.append(np.concatenate(run))
    modes.append(MODE_TEXT)
    return sequences, modes


@dataclasses.dataclass
class BatchAccumulator:
    """Collects encoded documents of one chunk into a `DocumentBatch` plus counters."""

    layout: VocabLayout
    sequences: List[np.ndarray] = dataclasses.field(default_factory=list)
    modes: List[int] = dataclasses.field(default_factory=list)
    document_lengths: List[int] = dataclasses.field(default_factory=list)
    counts: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("documents", "text_tokens", "image_tokens", "images", "special_tokens"), 0))

    def add(self, sequences: List[np.ndarray], modes: List[int]) -> None:
        self.sequences.extend(sequences)
        self.modes.extend(modes)
        self.document_lengths.append(len(sequences))
        self.counts["documents"] += 1
        for seq, mode in zip(sequences, modes):
            if mode == MODE_IMAGE:
                self.counts["image_tokens"] += seq.size
                self.counts["images"] += 1
            else:
                special = int(np.count_nonzero(self.layout.is_special(seq)))
                if not self.layout.dedicated_eos:  # a reused sentencepiece eos is not text
                    special += int(np.count_nonzero(seq == self.layout.eos_id))
                self.counts["special_tokens"] += special
                self.counts["text_tokens"] += seq.size - special

    def batch(self) -> DocumentBatch:
        dtype = self.layout.dtype
        tokens = np.concatenate(self.sequences).astype(dtype) if self.sequences else np.zeros(0, dtype)
        return DocumentBatch(tokens, np.array([s.size for s in self.sequences], dtype=np.int64),
                             np.array(self.document_lengths, dtype=np.int64), np.array(self.modes, dtype=np.int8))


def split_segments(tokens: np.ndarray, modes: Sequence[int], lengths: Sequence[int], layout: VocabLayout
                   ) -> List[Tuple[str, Any]]:
    """Stored sequences of one document -> [("text", ids) | ("image", codes) | ("break",) | ("eos",) |
    ("special", id)] in order: the inverse of `build_sequences`."""
    out: List[Tuple[str, Any]] = []
    start = 0
    for mode, length in zip(modes, lengths):
        seq = np.asarray(tokens[start:start + length], dtype=np.int64)
        start += length
        if mode == MODE_IMAGE:
            out.append((IMAGE, layout.format.parse(seq)[0]))
            continue
        text: List[int] = []
        for t in seq.tolist():
            kind = "break" if t == layout.break_id else "eos" if t == layout.eos_id else None
            if kind is None and layout.is_text(t):
                text.append(t)
                continue
            if text:
                out.append((TEXT, np.array(text, dtype=np.int64)))
                text = []
            out.append((kind,) if kind else ("special", t))
        if text:
            out.append((TEXT, np.array(text, dtype=np.int64)))
    return _merge_text(out)


def _merge_text(parts: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
    merged: List[Tuple[str, Any]] = []
    for part in parts:
        if part[0] == TEXT and merged and merged[-1][0] == TEXT:
            merged[-1] = (TEXT, np.concatenate([merged[-1][1], part[1]]))
        else:
            merged.append(part)
    return merged


def render_document(segments: List[Tuple[str, Any]], layout: VocabLayout, decode_text: Any) -> str:
    """Human-readable document: decoded text, `<break>`, `<eos>`, `<image: N codes [a b c ...]>`."""
    parts = []
    for seg in segments:
        if seg[0] == TEXT:
            parts.append(decode_text(seg[1].tolist()))
        elif seg[0] == IMAGE:
            head = " ".join(str(c) for c in seg[1][:8].tolist())
            parts.append(f"<image: {seg[1].size} codes [{head}{' ...' if seg[1].size > 8 else ''}]>")
        elif seg[0] == "special":
            parts.append(layout.token_name(seg[1]))
        else:
            parts.append(f"<{seg[0]}>")
    return "".join(parts)
