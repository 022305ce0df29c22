"""How a prefix's documents become training samples: packed windows, whole documents, or retrieval.

Why a choice per prefix: pretraining text and image-text data are packed
(Megatron's windows of `seq_length + 1` tokens cut from the shuffled document
stream, no padding wasted), but an instruction document cut that way can
give a sample that starts inside a response, whose prompt the model never
sees, and the loss then teaches answers to no question. Instruction data is
therefore laid out one whole document per sample (padded, loss 0 on the
padding), which is also what metaseq's fine-tuning did for the paper.

Why padding and not packing with attention and position resets between
documents (Megatron-LM's `--reset-attention-mask` / `--reset-position-ids`):
the one-document-per-sample layout already exists here for retrieval, runs
through every attention backend and parallel layout unchanged, and keeps
CM3's span moves inside one document; resets would need a per-sample
attention mask (or packed-sequence parameters) through both JAM-Cross
streams and every backend. The cost is padding, small for instruction sets
whose documents are curated to fit the context (paper: at most 3 images,
4,096 tokens; `tools/preprocess_instruct.py --max-images/--max-document-tokens`).

A document longer than `seq_length + 1` tokens is cut at the end: its
prompt and the start of its response are kept, the tail is never trained.
Splitting it instead would make exactly the samples this layout exists to
avoid (a response continued without its prompt). The count is logged.
"""

from __future__ import annotations

import os

import numpy as np

from megatron_jam.data.instruct import loss_mask_path
from megatron_jam.data.retrieval import neighbors_path
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

PACKED, DOCUMENT, RETRIEVAL = "packed", "document", "retrieval"
WHOLE_DOCUMENTS_CHOICES = ("auto", "always", "never")
"""auto: whole documents for instruction prefixes (those with PREFIX.loss_mask.npy), packed otherwise;
always: whole documents for every prefix; never: every prefix packed (the old behaviour)."""


def is_instruction_prefix(prefix: str) -> bool:
    """Instruction data is what tools/preprocess_instruct.py wrote: it has per-sequence loss flags."""
    return os.path.exists(loss_mask_path(prefix))


def sample_layout(prefix: str, whole_documents: str = "auto", retrieval: bool = False) -> str:
    """PACKED, DOCUMENT or RETRIEVAL for `prefix` (retrieval needs a neighbours file; see module docstring)."""
    if whole_documents not in WHOLE_DOCUMENTS_CHOICES:
        raise ValueError(f"whole_documents={whole_documents!r}: expected one of {WHOLE_DOCUMENTS_CHOICES}")
    if retrieval and os.path.exists(neighbors_path(prefix)):
        return RETRIEVAL
    whole = whole_documents == "always" or (whole_documents == "auto" and is_instruction_prefix(prefix))
    return DOCUMENT if whole else PACKED


def samples_per_epoch(doc_lengths: np.ndarray, layout: str, seq_length: int) -> int:
    """Samples that show every document of `doc_lengths` once: one per document, or Megatron's
    packed count ((tokens - 1) // seq_length: each window reads one token more than it trains on)."""
    if layout != PACKED:
        return int(doc_lengths.size)
    return max(int(np.sum(doc_lengths, dtype=np.int64)) - 1, 0) // seq_length


def log_truncated(prefix: str, doc_lengths: np.ndarray, seq_length: int) -> int:
    """Say how many documents are longer than a sample (cut at the end); returns that count."""
    long = int(np.count_nonzero(doc_lengths > seq_length + 1))
    if long:
        log_rank0(logger, "%s: %d of %d documents are longer than --seq-length %d + 1 tokens; each sample keeps "
                  "a document's first %d tokens (prompt first), the rest is not trained (curate with "
                  "tools/preprocess_instruct.py --max-images / --max-document-tokens)", prefix, long,
                  doc_lengths.size, seq_length, seq_length + 1)
    return long
