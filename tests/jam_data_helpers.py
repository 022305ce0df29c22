"""Tiny synthetic multimodal shards for the CM3 dataset, instruction and retrieval tests.

Why not the preprocessing tool: these tests need hundreds of documents with
known content in a second; writing token arrays straight through the C++
builder with the layout of :mod:`megatron_jam.data.documents` is that, and
`tests/test_preprocess.py` already covers the JSONL -> shards path.
"""

import numpy as np

from megatron_jam.data.documents import IMAGE, TEXT, build_sequences
from megatron_jam.data.indexed_builder import DocumentBatch, IndexedDatasetBuilder
from megatron_jam.data.instruct import loss_mask_path
from megatron_jam.data.vocab import VocabLayout, layout_path

LAYOUT = VocabLayout(text_vocab_size=200, codebook_size=64, tokens_per_image=16, num_sentinels=8)


def random_segments(rng, layout=LAYOUT, max_items=5, image_prob=0.4, max_text=40):
    """Segments [(TEXT|IMAGE, ids)] of one random document (at least one item)."""
    segments = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        if rng.random() < image_prob:
            codes = rng.integers(0, layout.codebook_size, layout.tokens_per_image)
            segments.append((IMAGE, layout.image_offset + codes))
        else:
            segments.append((TEXT, rng.integers(0, layout.text_vocab_size, int(rng.integers(1, max_text + 1)))))
    return segments


def document_tokens(segments, layout=LAYOUT):
    sequences, modes = build_sequences(segments, layout)
    return np.concatenate(sequences), sequences, modes


def write_dataset(prefix, documents, layout=LAYOUT, loss_flags=None):
    """Write documents [(sequences, modes)] as a multimodal dataset + layout (+ per-sequence loss flags)."""
    seqs = [s for d in documents for s in d[0]]
    batch = DocumentBatch(np.concatenate(seqs).astype(layout.dtype), np.array([s.size for s in seqs], np.int64),
                          np.array([len(d[0]) for d in documents], np.int64),
                          np.array([m for d in documents for m in d[1]], np.int8))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", layout.dtype, multimodal=True)
    builder.add_batch(batch)
    builder.finalize(f"{prefix}.idx")
    layout.to_json(layout_path(str(prefix)))
    if loss_flags is not None:
        np.save(loss_mask_path(str(prefix)), np.asarray(loss_flags, dtype=np.uint8))
    return str(prefix)


def text_only_corpus(rng, n, layout=LAYOUT, lo=20, hi=120):
    docs = []
    for _ in range(n):
        ids = rng.integers(0, layout.text_vocab_size, int(rng.integers(lo, hi)))
        sequences, modes = build_sequences([(TEXT, ids)], layout)
        docs.append((sequences, modes))
    return docs


def image_text_corpus(rng, n, layout=LAYOUT):
    """Caption + image documents (every one has at least one image)."""
    docs = []
    for _ in range(n):
        segments = random_segments(rng, layout, max_items=3, image_prob=0.5)
        segments.append((IMAGE, layout.image_offset + rng.integers(0, layout.codebook_size, layout.tokens_per_image)))
        docs.append(build_sequences(segments, layout))
    return docs
