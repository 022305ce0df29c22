"""The shared JAM vocabulary: where text ids, special tokens and image codes live.

Why a file of its own: the preprocessing tool, the CM3 dataset, the fused
model's embedding and the generator must all agree on which id means what.
The layout is written as JSON next to the shards (`PREFIX.vocab.json`) and
every later reader loads it and calls :meth:`VocabLayout.check_compatible`
instead of trusting that two configs happen to match.

Layout (ids are contiguous, in this order)::

    [0, text_vocab_size)                      text tokenizer ids, unchanged
    break_id = text_vocab_size                <break>  (modality change)
    eos_id                                    <eos>    (end of document), see below
    mask_id                                   <mask>   (reserved; no sample holds it, see below)
    eos_span_id                               <eos_span> (end of a CM3 span)
    sentinel_id(0) ... sentinel_id(S - 1)     <sentinel:i> (CM3 masks)
    [image_offset, image_offset + codebook_size)   VQ codes, code c -> image_offset + c

The text tokenizer is a sentencepiece model or a Hugging Face
``tokenizer.json`` (`megatron_jam.data.text_tokenizer`).

`<eos>`: when the text tokenizer has an end-of-sequence token
(sentencepiece ``sp.eos_id() >= 0``, e.g. Llama's ``</s>``; Hugging Face: the
``eos_token`` of ``tokenizer_config.json``) it is reused by default
(``text_eos_id``), so the text parent's trained end-of-document embedding row
keeps its meaning; otherwise a dedicated `<eos>` id follows `<break>`.

`num_sentinels` defaults to 32. CM3 draws the number of masked spans from
Poisson(1) and clamps it to the sentinel count: P(n > 8) is about 1e-6, so
32 never clamps in practice, still leaves room for larger-lambda ablations,
and costs 32 embedding rows.

The model's padded vocabulary (divisible by 128 x TP) is the model's
business; ids at or above :attr:`vocab_size` never occur in the data.

Native layouts (``kind="native"``, JSON version 2): when the image parent
already holds its image codes and image markers in its own vocabulary (Emu3:
codes at 151,854 + c), the fused model keeps those ids, so every trained
embedding and output row keeps its meaning. Nothing is derived from a
contiguous scheme then; the layout records every role explicitly:

- ``text_ranges``: half-open id ranges of ordinary text tokens (what text mode
  may sample; the tokenizer's own special and reserved tokens are not text);
- ``image_code_offset`` (codes contiguous, id = offset + c) or
  ``image_code_ids`` (an explicit code -> id map, e.g. Chameleon's codes that
  are BPE tokens 4..8195 in no code order);
- ``special_ids``: ``<break>`` (the token that opens an image: Emu3's
  ``<|image start|>``), ``<eos>``, ``<mask>``, ``<eos_span>`` and the
  sentinels, each either an existing (reserved) parent token or an appended
  row at ``parent_vocab_size`` and after; ids >= ``parent_vocab_size`` are
  the appended ones and must be contiguous from it;
- ``image_markers`` and ``size_digit_ids``: the structural tokens of the image
  format (``megatron_jam.data.image_format``), ``image_grid`` the default
  latent grid (``tokens_per_image`` = its h * w codes, a default, not a
  constant: Emu3 images carry their own grid size).

``megatron_jam.data.native_vocab.emu3_layout`` builds one from an Emu3
tokenizer folder, ``megatron_jam.data.chameleon_vocab.chameleon_layout`` from a
Chameleon / Anole / Lumina-mGPT model folder (``native_layout`` picks by format);
``megatron_jam.data.mixed_vocab.mixed_layout`` one whose text ids are another (LLM) tokenizer's, the image
parent's image part re-indexed after them (``image_parent_rows``; JAM-Cross only). Version-1 (appended) files
load and write exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

LAYOUT_VERSION = 1
NATIVE_LAYOUT_VERSION = 2
APPENDED, NATIVE = "appended", "native"
"""Layout kinds: our contiguous scheme after the text ids (version 1), or the parent's own ids (version 2)."""
NATIVE_FIELDS = ("kind", "image_format", "parent_vocab_size", "text_ranges", "image_code_offset",
                 "image_code_ids", "image_grid", "special_ids", "image_markers", "size_digit_ids",
                 "image_parent_rows", "image_parent_tokenizer")
"""Fields only native layouts write (an appended layout's JSON is exactly the version-1 file)."""
# kinds of ids in a native layout's lookup table
_OTHER, _TEXT, _SPECIAL, _IMAGE, _MARKER = 0, 1, 2, 3, 4
LAYOUT_SUFFIX = ".vocab.json"
DEFAULT_NUM_SENTINELS = 32
_SHARD_SUFFIX = re.compile(r"_\d{5}$")


class VocabLayoutError(ValueError):
    """A vocabulary layout file is malformed or two layouts disagree."""


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Id ranges of the shared text + special + image vocabulary (see module docstring)."""

    text_vocab_size: int
    """Number of text tokenizer ids (sentencepiece pieces, or a tokenizer.json's vocabulary with added tokens)."""
    codebook_size: int
    """Number of VQ codebook entries; image ids are image_offset + code (native: see `image_ids`)."""
    tokens_per_image: int
    """VQ codes per image (e.g. 1024 for a 32x32 latent grid); fixed per image tokenizer. In image formats
    that write the grid into the tokens (Emu3) only the default: data may hold other grids."""
    num_sentinels: int = DEFAULT_NUM_SENTINELS
    """Number of CM3 `<sentinel:i>` tokens."""
    text_eos_id: Optional[int] = None
    """Text tokenizer id reused as `<eos>`; None means a dedicated `<eos>` after `<break>`."""
    text_tokenizer: str = ""
    """Identity of the text tokenizer ("sentencepiece:sha256:..." or "huggingface:sha256:..."), "" if unknown."""
    image_tokenizer: str = ""
    """Identity of the image tokenizer ("chameleon_vqgan:sha256:..."), "" if codes were given."""
    version: int = LAYOUT_VERSION
    """Format version of this layout file (1: appended, 2: native)."""
    kind: str = APPENDED
    """`appended` (the contiguous scheme above) or `native` (the parent's own ids, fields below)."""
    image_format: str = "ours"
    """How an image sits in the token stream (`megatron_jam.data.image_format`): `ours`, `emu3`, `chameleon` or
    `lumina`."""
    parent_vocab_size: int = 0
    """Native: embedding rows of the parent; ids at and above it are appended special rows."""
    text_ranges: Tuple[Tuple[int, int], ...] = ()
    """Native: half-open ranges of ordinary text ids."""
    image_code_offset: int = -1
    """Native: id of code 0 when codes are contiguous (id = offset + code); -1 when `image_code_ids` is given."""
    image_code_ids: Tuple[int, ...] = ()
    """Native: explicit code -> id map (index = code) when codes are not contiguous."""
    image_grid: Tuple[int, ...] = ()
    """Native: default latent grid (h, w); tokens_per_image = h * w."""
    special_ids: Dict[str, int] = dataclasses.field(default_factory=dict)
    """Native: `<break>`, `<eos>`, `<mask>`, `<eos_span>`, `<sentinel:i>` -> id (reserved parent token or appended)."""
    image_markers: Dict[str, int] = dataclasses.field(default_factory=dict)
    """Native: structural tokens of the image format by role (e.g. `end_of_line` -> id)."""
    size_digit_ids: Dict[str, int] = dataclasses.field(default_factory=dict)
    """Native: ids of "0".."9" and "*", how an image's grid size is written as text (Emu3's `90*90`)."""
    image_parent_rows: Tuple[Tuple[int, int, int], ...] = ()
    """Mixed (a native layout over two tokenizers, `megatron_jam.data.mixed_vocab`): (id, image-parent id,
    count) ranges tiling [text_vocab_size, parent_vocab_size), the image part re-indexed after the LLM's ids."""
    image_parent_tokenizer: str = ""
    """Mixed: identity of the image parent's tokenizer.json ("huggingface:sha256:..."), "" if unknown."""

    def __hash__(self) -> int:  # dict fields: hash the canonical JSON instead
        return hash(self.to_json())

    def __post_init__(self) -> None:
        if self.kind == NATIVE:
            self._normalise_native()
            return
        if self.kind != APPENDED:
            raise VocabLayoutError(f"VocabLayout.kind must be {APPENDED!r} or {NATIVE!r}, got {self.kind!r}")
        if self.image_format != "ours" or any(getattr(self, f) != _DEFAULTS[f] for f in NATIVE_FIELDS[2:]):
            raise VocabLayoutError("VocabLayout: native fields (image_format, special_ids, ...) need kind='native'")
        for name in ("text_vocab_size", "codebook_size", "tokens_per_image"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise VocabLayoutError(f"VocabLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_sentinels, int) or self.num_sentinels < 0:
            raise VocabLayoutError(f"VocabLayout.num_sentinels must be >= 0, got {self.num_sentinels!r}")
        if self.text_eos_id is not None and not 0 <= self.text_eos_id < self.text_vocab_size:
            raise VocabLayoutError(
                f"VocabLayout.text_eos_id {self.text_eos_id} is outside the text vocabulary "
                f"[0, {self.text_vocab_size})"
            )
        if self.version != LAYOUT_VERSION:
            raise VocabLayoutError(f"unsupported vocabulary layout version {self.version} (expected {LAYOUT_VERSION})")

    def _normalise_native(self) -> None:
        """Canonical types (JSON gives lists) and the consistency rules of a native layout."""
        put = functools.partial(object.__setattr__, self)
        put("text_ranges", tuple((int(a), int(b)) for a, b in self.text_ranges))
        put("image_code_ids", tuple(int(i) for i in self.image_code_ids))
        put("image_grid", tuple(int(i) for i in self.image_grid))
        put("image_parent_rows", tuple(tuple(int(x) for x in r) for r in self.image_parent_rows))
        for name in ("special_ids", "image_markers", "size_digit_ids"):
            put(name, {str(k): int(v) for k, v in dict(getattr(self, name)).items()})
        from megatron_jam.data.native_vocab import validate_native

        validate_native(self)

    @property
    def native(self) -> bool:
        """Whether ids are the parent's own (version 2) rather than our contiguous scheme."""
        return self.kind == NATIVE

    @property
    def mixed(self) -> bool:
        """Whether text ids are one parent's tokenizer and the image part another's (JAM-Cross only)."""
        return bool(self.image_parent_rows)

    # ------------------------------------------------------------------ ids
    @property
    def break_id(self) -> int:
        """`<break>`: separates a text run from an image (and two adjacent images); in a native layout the
        token that opens an image (Emu3: `<|image start|>`)."""
        return self.special_ids["<break>"] if self.native else self.text_vocab_size

    @property
    def dedicated_eos(self) -> bool:
        """Whether `<eos>` has its own id in the special block (not the text tokenizer's)."""
        return self.text_eos_id is None

    @property
    def eos_id(self) -> int:
        """`<eos>`: ends every document."""
        if self.native:
            return self.special_ids["<eos>"]
        return self.text_vocab_size + 1 if self.dedicated_eos else int(self.text_eos_id)

    @property
    def mask_id(self) -> int:
        """`<mask>`: reserved. No training sample contains it, so its embedding row is untrained; the
        unconditional context of classifier-free guidance is CM3's `<sentinel:0>` instead (decoding.py)."""
        if self.native:
            return self.special_ids["<mask>"]
        return self.text_vocab_size + (2 if self.dedicated_eos else 1)

    @property
    def eos_span_id(self) -> int:
        """`<eos_span>`: closes a CM3 span appended at the end of a sample."""
        return self.special_ids["<eos_span>"] if self.native else self.mask_id + 1

    def sentinel_id(self, i: int) -> int:
        """`<sentinel:i>`, 0 <= i < num_sentinels."""
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range [0, {self.num_sentinels})")
        return self.special_ids[f"<sentinel:{i}>"] if self.native else self.eos_span_id + 1 + i

    @property
    def image_offset(self) -> int:
        """Id of image code 0 (in a native layout with an explicit code map, codes need not follow it:
        convert with `image_ids` / `image_codes`)."""
        if self.native:
            return self.image_code_offset if self.image_code_offset >= 0 else self.image_code_ids[0]
        return self.eos_span_id + 1 + self.num_sentinels

    @property
    def text_rows(self) -> int:
        """Rows before the image codes: what JAM-Cross takes from both parents (all text-side rows); in a
        mixed layout the LLM's rows (everything after them is the image parent's, `image_parent_rows`)."""
        if self.mixed:
            return self.text_vocab_size
        if self.native:
            return self.image_offset if self.image_code_offset >= 0 else min(self.image_code_ids)
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of ids used by data (before any model padding)."""
        if self.native:
            return max(self.parent_vocab_size, max(self.special_ids.values()) + 1)
        return self.image_offset + self.codebook_size

    @property
    def appended_specials(self) -> Dict[str, int]:
        """Native: the special tokens that are rows appended after the parent's vocabulary."""
        return {k: v for k, v in self.special_ids.items() if v >= self.parent_vocab_size} if self.native else {}

    @property
    def format(self):
        """The `ImageFormat` of this layout (how an image sits in the token stream)."""
        from megatron_jam.data.image_format import image_format

        return image_format(self)

    @functools.cached_property
    def _kinds(self) -> np.ndarray:
        """Native: id -> kind (_TEXT, _SPECIAL, ...) over [0, vocab_size)."""
        from megatron_jam.data.native_vocab import kind_table

        return kind_table(self)

    @functools.cached_property
    def _code_of(self) -> np.ndarray:
        """Native: id -> code (-1 for a non-image id) over [0, vocab_size)."""
        table = np.full(self.vocab_size, -1, dtype=np.int64)
        table[self._code_ids] = np.arange(self.codebook_size)
        return table

    @functools.cached_property
    def _code_ids(self) -> np.ndarray:
        """Native: code -> id."""
        if self.image_code_offset >= 0:
            return np.arange(self.codebook_size, dtype=np.int64) + self.image_code_offset
        return np.asarray(self.image_code_ids, dtype=np.int64)

    def _is_kind(self, ids: Any, kind: int) -> np.ndarray:
        ids = np.asarray(ids)
        inside = (ids >= 0) & (ids < self.vocab_size)
        return inside & (self._kinds[np.clip(ids, 0, self.vocab_size - 1)] == kind)

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the shards (Megatron's rule: uint16 below 65500 ids, else int32)."""
        return np.dtype(np.uint16) if self.vocab_size < 65500 else np.dtype(np.int32)

    def special_tokens(self) -> Dict[str, int]:
        """Name -> id of every special token (including `<eos>` when it is sentencepiece's)."""
        if self.native:
            return dict(self.special_ids)
        names = {"<break>": self.break_id, "<eos>": self.eos_id, "<mask>": self.mask_id,
                 "<eos_span>": self.eos_span_id}
        names.update({f"<sentinel:{i}>": self.sentinel_id(i) for i in range(self.num_sentinels)})
        return names

    # ------------------------------------------------------------ vectorised
    def is_image(self, ids: Any) -> np.ndarray:
        """Boolean mask of image-code ids (numpy, any shape)."""
        if self.native:
            return self._is_kind(ids, _IMAGE)
        ids = np.asarray(ids)
        return (ids >= self.image_offset) & (ids < self.vocab_size)

    def is_text(self, ids: Any) -> np.ndarray:
        """Boolean mask of text ids (appended layout: including a reused text-tokenizer `<eos>`)."""
        if self.native:
            return self._is_kind(ids, _TEXT)
        ids = np.asarray(ids)
        return (ids >= 0) & (ids < self.text_vocab_size)

    def is_special(self, ids: Any) -> np.ndarray:
        """Boolean mask of special ids (appended layout: the special block; native: every role id and image
        marker, except an `<eos>` reused from the text tokenizer, as in the appended layout)."""
        if self.native:
            return self._is_kind(ids, _SPECIAL) | self._is_kind(ids, _MARKER)
        ids = np.asarray(ids)
        return (ids >= self.text_vocab_size) & (ids < self.image_offset)

    def is_sentinel(self, ids: Any) -> np.ndarray:
        """Boolean mask of CM3 `<sentinel:i>` ids."""
        ids = np.asarray(ids)
        if self.native:
            return np.isin(ids, [self.sentinel_id(i) for i in range(self.num_sentinels)])
        return (ids >= self.eos_span_id + 1) & (ids < self.image_offset)

    def image_ids(self, codes: Any, where: str = "image codes") -> np.ndarray:
        """VQ codes -> vocabulary ids (int64); raises if a code is outside the codebook."""
        codes = np.asarray(codes)
        if codes.size and (not np.issubdtype(codes.dtype, np.integer)
                           or codes.min() < 0 or codes.max() >= self.codebook_size):
            raise VocabLayoutError(f"{where}: codes must be integers in [0, {self.codebook_size})")
        if self.native:
            return self._code_ids[codes.astype(np.int64)]
        return codes.astype(np.int64) + self.image_offset

    def image_codes(self, ids: Any) -> np.ndarray:
        """Vocabulary ids of image tokens -> VQ codes (int64); raises on a non-image id."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.is_image(ids).all():
            raise VocabLayoutError("image_codes: some ids are not image tokens")
        if self.native:
            return self._code_of[ids]
        return ids - self.image_offset

    def check_ids(self, ids: Any, where: str) -> None:
        """Raise VocabLayoutError naming `where` if any id is outside [0, vocab_size)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise VocabLayoutError(f"{where}: token id {int(bad)} outside the vocabulary [0, {self.vocab_size})")

    def token_name(self, token_id: int) -> str:
        """Human-readable name of a non-text id ("<break>", "<img:17>", ...)."""
        if self.is_image(token_id):
            return f"<img:{int(self.image_codes(token_id))}>"
        for name, value in self.special_tokens().items():
            if value == token_id:
                return name
        for name, value in self.image_markers.items():
            if value == token_id:
                return f"<{name}>"
        return f"<id:{token_id}>"

    # ------------------------------------------------------------- files
    def to_dict(self) -> Dict[str, Any]:
        """The defining fields plus derived ids (checked on load) for human readers."""
        fields = dataclasses.asdict(self)
        if not self.native:  # exactly the version-1 file
            fields = {k: v for k, v in fields.items() if k not in NATIVE_FIELDS}
        fields["derived"] = {"vocab_size": self.vocab_size, "image_offset": self.image_offset,
                             "break_id": self.break_id, "eos_id": self.eos_id, "mask_id": self.mask_id,
                             "eos_span_id": self.eos_span_id, "dtype": self.dtype.name}
        if self.native:
            fields["derived"]["appended_specials"] = sorted(self.appended_specials)
        return fields

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """Serialise; with `path`, also write the file atomically (temporary name + rename)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "<dict>") -> "VocabLayout":
        """Build from `to_dict` output; derived ids, if present, must match."""
        if not isinstance(data, dict):
            raise VocabLayoutError(f"{source}: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"derived"}
        if unknown:
            raise VocabLayoutError(f"{source}: unknown fields {sorted(unknown)}")
        try:
            layout = cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise VocabLayoutError(f"{source}: {e}") from e
        derived = data.get("derived", {})
        mismatched = {k: v for k, v in derived.items() if layout.to_dict()["derived"].get(k) != v}
        if mismatched:
            raise VocabLayoutError(f"{source}: derived ids {mismatched} disagree with the fields")
        return layout

    @classmethod
    def from_json(cls, path_or_text: Union[str, os.PathLike]) -> "VocabLayout":
        """Load from a file path, or parse a JSON string that starts with '{'."""
        text, source = os.fspath(path_or_text), "<string>"
        if not text.lstrip().startswith("{"):
            source = text
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabLayoutError(f"{source}: invalid JSON ({e})") from e
        return cls.from_dict(data, source)

    def check_compatible(self, other: "VocabLayout", mine: str = "this layout", theirs: str = "other") -> None:
        """Raise VocabLayoutError listing every field on which the two layouts differ.

        Tokenizer identities are compared only when both sides record one.
        """
        diffs = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("text_tokenizer", "image_tokenizer", "image_parent_tokenizer") and (not a or not b):
                continue
            if a != b:
                if isinstance(a, (dict, tuple)) and len(repr(a)) > 200:
                    a, b = f"<{len(a)} entries>", f"<{len(b)} entries, different>"
                diffs.append(f"{f.name}: {a!r} ({mine}) != {b!r} ({theirs})")
        if diffs:
            raise VocabLayoutError("incompatible vocabulary layouts: " + "; ".join(diffs))


_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
             for f in dataclasses.fields(VocabLayout)}


def layout_path(prefix: str) -> str:
    """Where the layout of the dataset(s) written under `prefix` lives."""
    return prefix + LAYOUT_SUFFIX


def find_layout(prefix: str) -> str:
    """Layout file of a dataset prefix; a shard `P_00003` falls back to `P.vocab.json`."""
    candidates = [layout_path(prefix)]
    if _SHARD_SUFFIX.search(prefix):
        candidates.append(layout_path(_SHARD_SUFFIX.sub("", prefix)))
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no vocabulary layout for dataset {prefix!r}: looked for {candidates}")


def load_layout(prefix: str, expected: Optional[VocabLayout] = None, expected_source: str = "expected"
                ) -> VocabLayout:
    """Load the layout of `prefix`, check it against the .idx dtype and optionally `expected` (named
    `expected_source` in the message, e.g. the checkpoint's layout file)."""
    path = find_layout(prefix)
    layout = VocabLayout.from_json(path)
    idx = prefix + ".idx"
    if os.path.exists(idx):
        from megatron_jam.data.indexed_builder import read_index_header

        dtype = np.dtype(read_index_header(idx)["dtype"])
        if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < layout.vocab_size - 1:
            raise VocabLayoutError(f"{idx}: token dtype {dtype.name} cannot hold the {layout.vocab_size} ids of {path}")
    if expected is not None:
        layout.check_compatible(expected, mine=path, theirs=expected_source)
    return layout
