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
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, Optional, Union

import numpy as np

LAYOUT_VERSION = 1
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
    """Number of VQ codebook entries; image ids are image_offset + code."""
    tokens_per_image: int
    """VQ codes per image (e.g. 1024 for a 32x32 latent grid); fixed per image tokenizer."""
    num_sentinels: int = DEFAULT_NUM_SENTINELS
    """Number of CM3 `<sentinel:i>` tokens."""
    text_eos_id: Optional[int] = None
    """Text tokenizer id reused as `<eos>`; None means a dedicated `<eos>` after `<break>`."""
    text_tokenizer: str = ""
    """Identity of the text tokenizer ("sentencepiece:sha256:..." or "huggingface:sha256:..."), "" if unknown."""
    image_tokenizer: str = ""
    """Identity of the image tokenizer ("chameleon_vqgan:sha256:..."), "" if codes were given."""
    version: int = LAYOUT_VERSION
    """Format version of this layout file."""

    def __post_init__(self) -> None:
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

    # ------------------------------------------------------------------ ids
    @property
    def break_id(self) -> int:
        """`<break>`: separates a text run from an image (and two adjacent images)."""
        return self.text_vocab_size

    @property
    def dedicated_eos(self) -> bool:
        """Whether `<eos>` has its own id in the special block."""
        return self.text_eos_id is None

    @property
    def eos_id(self) -> int:
        """`<eos>`: ends every document."""
        return self.text_vocab_size + 1 if self.dedicated_eos else int(self.text_eos_id)

    @property
    def mask_id(self) -> int:
        """`<mask>`: reserved. No training sample contains it, so its embedding row is untrained; the
        unconditional context of classifier-free guidance is CM3's `<sentinel:0>` instead (decoding.py)."""
        return self.text_vocab_size + (2 if self.dedicated_eos else 1)

    @property
    def eos_span_id(self) -> int:
        """`<eos_span>`: closes a CM3 span appended at the end of a sample."""
        return self.mask_id + 1

    def sentinel_id(self, i: int) -> int:
        """`<sentinel:i>`, 0 <= i < num_sentinels."""
        if not 0 <= i < self.num_sentinels:
            raise IndexError(f"sentinel {i} out of range [0, {self.num_sentinels})")
        return self.eos_span_id + 1 + i

    @property
    def num_special_tokens(self) -> int:
        """Ids between the text vocabulary and the image codes."""
        return self.image_offset - self.text_vocab_size

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.eos_span_id + 1 + self.num_sentinels

    @property
    def vocab_size(self) -> int:
        """Number of ids used by data (before any model padding)."""
        return self.image_offset + self.codebook_size

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the shards (Megatron's rule: uint16 below 65500 ids, else int32)."""
        return np.dtype(np.uint16) if self.vocab_size < 65500 else np.dtype(np.int32)

    def special_tokens(self) -> Dict[str, int]:
        """Name -> id of every special token (including `<eos>` when it is sentencepiece's)."""
        names = {"<break>": self.break_id, "<eos>": self.eos_id, "<mask>": self.mask_id,
                 "<eos_span>": self.eos_span_id}
        names.update({f"<sentinel:{i}>": self.sentinel_id(i) for i in range(self.num_sentinels)})
        return names

    # ------------------------------------------------------------ vectorised
    def is_image(self, ids: Any) -> np.ndarray:
        """Boolean mask of image-code ids (numpy, any shape)."""
        ids = np.asarray(ids)
        return (ids >= self.image_offset) & (ids < self.vocab_size)

    def is_text(self, ids: Any) -> np.ndarray:
        """Boolean mask of sentencepiece ids (including a reused sentencepiece `<eos>`)."""
        ids = np.asarray(ids)
        return (ids >= 0) & (ids < self.text_vocab_size)

    def is_special(self, ids: Any) -> np.ndarray:
        """Boolean mask of ids in the special block."""
        ids = np.asarray(ids)
        return (ids >= self.text_vocab_size) & (ids < self.image_offset)

    def image_ids(self, codes: Any, where: str = "image codes") -> np.ndarray:
        """VQ codes -> vocabulary ids (int64); raises if a code is outside the codebook."""
        codes = np.asarray(codes)
        if codes.size and (not np.issubdtype(codes.dtype, np.integer)
                           or codes.min() < 0 or codes.max() >= self.codebook_size):
            raise VocabLayoutError(f"{where}: codes must be integers in [0, {self.codebook_size})")
        return codes.astype(np.int64) + self.image_offset

    def image_codes(self, ids: Any) -> np.ndarray:
        """Vocabulary ids of image tokens -> VQ codes (int64); raises on a non-image id."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.is_image(ids).all():
            raise VocabLayoutError("image_codes: some ids are not image tokens")
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
            return f"<img:{token_id - self.image_offset}>"
        for name, value in self.special_tokens().items():
            if value == token_id:
                return name
        return f"<id:{token_id}>"

    # ------------------------------------------------------------- files
    def to_dict(self) -> Dict[str, Any]:
        """The defining fields plus derived ids (checked on load) for human readers."""
        fields = dataclasses.asdict(self)
        fields["derived"] = {"vocab_size": self.vocab_size, "image_offset": self.image_offset,
                             "break_id": self.break_id, "eos_id": self.eos_id, "mask_id": self.mask_id,
                             "eos_span_id": self.eos_span_id, "dtype": self.dtype.name}
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
            if f.name in ("text_tokenizer", "image_tokenizer") and (not a or not b):
                continue
            if a != b:
                diffs.append(f"{f.name}: {a!r} ({mine}) != {b!r} ({theirs})")
        if diffs:
            raise VocabLayoutError("incompatible vocabulary layouts: " + "; ".join(diffs))


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


def load_layout(prefix: str, expected: Optional[VocabLayout] = None) -> VocabLayout:
    """Load the layout of `prefix`, check it against the .idx dtype and optionally `expected`."""
    path = find_layout(prefix)
    layout = VocabLayout.from_json(path)
    idx = prefix + ".idx"
    if os.path.exists(idx):
        from megatron_jam.data.indexed_builder import read_index_header

        dtype = np.dtype(read_index_header(idx)["dtype"])
        if not np.issubdtype(dtype, np.integer) or np.iinfo(dtype).max < layout.vocab_size - 1:
            raise VocabLayoutError(f"{idx}: token dtype {dtype.name} cannot hold the {layout.vocab_size} ids of {path}")
    if expected is not None:
        layout.check_compatible(expected, mine=path, theirs="expected")
    return layout
