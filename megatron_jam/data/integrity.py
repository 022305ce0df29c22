"""What every reader of shards checks before it reads a document: the files agree with each other,
and the data's vocabulary layout is the checkpoint's.

Why: Megatron's `IndexedDataset` trusts the .bin/.idx pair. A .bin 2 bytes short passes until
its last document is read (then a numpy error naming no file), extra bytes are never noticed,
and an .idx whose dtype byte was changed reads the tokens as garbage. A dataset preprocessed
with another layout (another sentinel count, so every image id shifts; another tokenizer)
trains and evaluates without a word. Each of these is one line naming the file here, before
the model sees a token. The checks read the .idx sections once (memory-mapped; 4 bytes per
stored sequence) and are cached per file version, so the trainer's early check and the
dataset builder's share the cost.

Used by the trainer (`megatron_jam.training.data`), the CM3 dataset builder
(`megatron_jam.data.cm3_dataset`) and evaluation (`megatron_jam.evaluation`, tools/evaluate.py).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from megatron_jam.data.indexed_builder import read_index_header
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, find_layout, load_layout

_HEADER_BYTES = 34  # magic 9, version 8, dtype 1, sequence count 8, document count 8
CHECKPOINT_LAYOUT_FILES = ("vocab_layout.json", "vocab.json")
"""Where a checkpoint folder records the layout it was trained or converted with (the trainer
writes the first; `megatron_jam.inference.loading.LAYOUT_FILES` reads the same names)."""
_VERIFIED: Dict[Tuple, Dict[str, Any]] = {}


class DatasetFileError(ValueError):
    """A dataset's files do not fit together or do not fit the model; the message names the file."""


def _version(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def _require_file(path: str) -> None:
    if os.path.isdir(path):
        raise DatasetFileError(f"{path} is a directory, not a dataset file")
    if not os.path.isfile(path):
        raise DatasetFileError(f"{path}: no such file")


def check_dataset_files(prefix: str) -> Dict[str, Any]:
    """Check PREFIX.bin against PREFIX.idx; returns the index header.

    The .bin must hold exactly the tokens the index describes (sum of the sequence lengths x the
    dtype's size: catches truncation, extra bytes and a changed dtype byte), the sequence pointers
    must start at 0 and end at the end of the .bin, and the document index must run from 0 to the
    sequence count without going back.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    _require_file(idx)
    _require_file(bin_)
    key = (os.path.abspath(prefix), _version(idx), _version(bin_))
    if key in _VERIFIED:
        return _VERIFIED[key]
    try:
        header = read_index_header(idx)
    except (ValueError, RuntimeError, OSError) as e:
        raise DatasetFileError(str(e) if idx in str(e) else f"{idx}: {e}") from e
    n, d, dtype = header["sequence_count"], header["document_count"], header["dtype"]
    lengths = _section(idx, _HEADER_BYTES, np.int32, n)
    pointers = _section(idx, _HEADER_BYTES + 4 * n, np.int64, n)
    documents = _section(idx, _HEADER_BYTES + 12 * n, np.int64, d)
    size, tokens = os.path.getsize(bin_), int(lengths.sum(dtype=np.int64))
    expected = tokens * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else f"{size - expected} bytes too many"
        raise DatasetFileError(f"{bin_}: {size} bytes, but {idx} describes {tokens} {dtype.name} tokens ({expected} "
                               f"bytes): {what}, or the index is not this data's (dtype changed?); re-run the "
                               "preprocessing")
    if n and (lengths.min() < 0 or pointers[0] != 0 or int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize != size):
        raise DatasetFileError(f"{idx}: the sequence lengths and pointers do not cover {bin_} (corrupt index)")
    if documents[0] != 0 or documents[-1] != n or (d > 1 and np.any(np.diff(documents) < 0)):
        raise DatasetFileError(f"{idx}: the document index does not run from 0 to the {n} sequences (corrupt index)")
    _VERIFIED[key] = header
    return header


def _section(path: str, offset: int, dtype: Any, count: int) -> np.ndarray:
    """One .idx section, memory-mapped (no copy of a multi-GB index)."""
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.zeros(0, dtype)


def index_arrays(prefix: str) -> Dict[str, np.ndarray]:
    """The checked .idx sections of PREFIX, memory-mapped, as Megatron-Core's `IndexedDataset` reads them
    (DESIGN.md section 3): sequence lengths and byte pointers, document boundaries, sequence modes (zeros
    when the dataset has none) and the header. Inspection reads them without importing Megatron-Core."""
    header = check_dataset_files(prefix)
    n, d, idx = header["sequence_count"], header["document_count"], prefix + ".idx"
    modes_at = _HEADER_BYTES + 12 * n + 8 * d
    return {"header": header, "lengths": _section(idx, _HEADER_BYTES, np.int32, n),
            "pointers": _section(idx, _HEADER_BYTES + 4 * n, np.int64, n),
            "documents": _section(idx, _HEADER_BYTES + 12 * n, np.int64, d),
            "modes": _section(idx, modes_at, np.int8, n) if header["has_modes"] else np.zeros(n, np.int8)}


def checkpoint_layout(folder: Optional[str]) -> Tuple[Optional[VocabLayout], Optional[str]]:
    """(layout, its file) recorded in a checkpoint folder, or (None, None) when it records none
    (a converted checkpoint without one, a run from before the trainer recorded it)."""
    for name in CHECKPOINT_LAYOUT_FILES if folder else ():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                return VocabLayout.from_json(path), path
            except (OSError, VocabLayoutError) as e:
                raise DatasetFileError(f"{path}: {e}") from e
    return None, None


def check_data_for_checkpoint(prefixes: Sequence[str], checkpoint_dir: Optional[str],
                              require_layout: bool = True) -> Dict[str, Optional[VocabLayout]]:
    """{prefix: its layout} after checking each dataset's files, its layout (the dtype holds its
    ids) and, when the checkpoint records one, that the layout is the checkpoint's, field by field
    (`VocabLayout.check_compatible`: the sentinel count, the image offset, the tokenizers...).
    `require_layout=False` accepts a plain Megatron dataset without PREFIX.vocab.json (evaluation
    of a text-only model); its layout is None."""
    expected, source = checkpoint_layout(checkpoint_dir)
    out: Dict[str, Optional[VocabLayout]] = {}
    for prefix in prefixes:
        check_dataset_files(prefix)
        try:
            find_layout(prefix)
        except FileNotFoundError as e:
            if require_layout:
                raise DatasetFileError(str(e)) from e
            out[prefix] = None
            continue
        try:
            out[prefix] = load_layout(prefix, expected=expected, expected_source=source or "expected")
        except (OSError, VocabLayoutError) as e:
            hint = f"; preprocess the data with --vocab-layout {source}" if expected is not None else ""
            raise DatasetFileError(f"{find_layout(prefix)} does not fit: {e}{hint}") from e
    return out
