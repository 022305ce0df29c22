"""The JAM training dataset: a Megatron-Core `GPTDataset` over whole multimodal documents, with CM3.

Why a `GPTDataset` subclass and not a new index machinery: Megatron's document
/ sample / shuffle indices, their on-disk cache (built on rank 0, then loaded
by the others), epochs and the separate final epoch, and the blend syntax of
`BlendedMegatronDatasetBuilder` all carry over unchanged. What changes is the
unit: `GPTDataset` shuffles and packs *stored sequences*, which for our
multimodal shards would scatter a document's images and text runs across the
corpus. `JamDocuments` (the low-level dataset) presents each *document* (its
sequences are contiguous in the .bin) as one Megatron "sequence", so Megatron
shuffles and packs documents, and train/valid/test splits fall on document
boundaries.

Three sample layouts, chosen per prefix (:mod:`megatron_jam.data.sample_layouts`):

- packed (default for pretraining data): Megatron's packing; sample i is a
  window of `seq_length + 1` tokens of the shuffled document stream (it may
  start or end inside a document or an image);
- document (default for instruction data, `JamDatasetConfig.whole_documents`):
  one whole document per sample, cut at the end to `seq_length + 1` tokens,
  then padding (loss 0), so a response is never seen without its prompt;
- retrieval (when `JamDatasetConfig.retrieval` is set and the prefix has a
  `PREFIX.neighbors.npy` from `tools/retrieve.py`): one query document per
  sample, laid out as ``[nb_1 ... nb_j, query]`` — up to k retrieved bank
  documents in rank order (best first) that fit whole in front of the query,
  the query cut to `seq_length + 1` tokens, then padding (loss 0).

Then, per sample, with a generator seeded by (seed, prefix name, split, sample
index): the CM3 transform (:mod:`megatron_jam.data.cm3`) when `cm3.enabled`,
and the sample dict: tokens, labels, loss_mask, position_ids ([s] each) and
modality ([s], 1 where the *label* is an image code, else 0). Loss weights:
1 per token, 0 on prompt tokens of instruction data (`PREFIX.loss_mask.npy`,
:mod:`megatron_jam.data.instruct`) and on padding, `retrieval.loss_weight`
on retrieved documents, `cm3.sentinel_loss_weight` where the label is a
sentinel. A sample is a pure function of the shards, the config and its
index, so a run resumed at sample N sees exactly the samples it would have
seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from megatron_jam.data.cm3 import CM3Config, cm3_transform
from megatron_jam.data.instruct import load_sequence_loss
from megatron_jam.data.integrity import check_dataset_files
from megatron_jam.data.retrieval import RetrievalConfig, load_neighbors
from megatron_jam.data.sample_layouts import DOCUMENT, PACKED, RETRIEVAL, log_truncated, sample_layout
from megatron_jam.data.vocab import VocabLayout, load_layout
from megatron_jam.models.config import ConfigError
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


class LayoutTokenizer:
    """The few tokenizer attributes Megatron's GPT dataset config reads, from a `VocabLayout`."""

    def __init__(self, layout: VocabLayout) -> None:
        self.layout = layout
        self.vocab_size = layout.vocab_size
        self.eod = layout.eos_id
        self.unique_identifiers = {"class": "VocabLayout", **layout.to_dict()}


@dataclasses.dataclass(kw_only=True)
class JamDatasetConfig(GPTDatasetConfig):
    """`GPTDatasetConfig` plus the JAM fields; the tokenizer is derived from `layout`."""

    layout: Optional[VocabLayout] = None
    """The vocabulary layout every prefix must match (required)."""
    cm3: Optional[CM3Config] = None
    """The CM3 objective; None or `enabled=False` = plain causal LM."""
    retrieval: Optional[RetrievalConfig] = None
    """Prepend retrieved documents (prefixes with a neighbours file); None = off."""
    whole_documents: str = "auto"
    """One document per sample: "auto" (instruction prefixes), "always" or "never" (sample_layouts)."""
    prompt_loss: bool = False
    """Train on the prompt tokens of instruction data too (ignore PREFIX.loss_mask.npy's zeros)."""

    def __post_init__(self) -> None:
        if self.layout is None:
            raise ValueError("JamDatasetConfig.layout is required (see megatron_jam.data.vocab.load_layout)")
        if self.tokenizer is None:
            self.tokenizer = LayoutTokenizer(self.layout)
        self.reset_position_ids = bool(self.reset_position_ids)
        self.reset_attention_mask = bool(self.reset_attention_mask)
        self.eod_mask_loss = bool(self.eod_mask_loss)
        self.create_attention_mask = False
        self.add_extra_token_to_sequence = True
        super().__post_init__()


class DocumentReader:
    """Whole documents of one multimodal dataset as token arrays (no copies of the index)."""

    def __init__(self, prefix: str, layout: Optional[VocabLayout], mmap: bool = True) -> None:
        self.path_prefix = prefix
        check_dataset_files(prefix)  # cached: free after the builder's check
        self.layout = load_layout(prefix, expected=layout)
        self.indexed = IndexedDataset(prefix, multimodal=True, mmap=mmap)
        index = self.indexed.index
        self.dtype, self.itemsize = index.dtype, np.dtype(index.dtype).itemsize
        self.seq_lengths = index.sequence_lengths
        self.doc_seq = index.document_indices
        first = self.doc_seq[:-1]
        self.doc_pointer = index.sequence_pointers[first] if first.size else np.zeros(0, np.int64)
        ends = np.concatenate([[0], np.cumsum(self.seq_lengths, dtype=np.int64)])
        self.doc_lengths = (ends[self.doc_seq[1:]] - ends[first]).astype(np.int32)

    @property
    def num_documents(self) -> int:
        return int(self.doc_lengths.size)

    def tokens(self, doc: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document `doc` (int64)."""
        doc = int(doc)
        length = int(self.doc_lengths[doc]) - offset if length is None else int(length)
        data = self.indexed.bin_reader.read(dtype=self.dtype, count=length,
                                            offset=int(self.doc_pointer[doc]) + int(offset) * self.itemsize)
        return data.astype(np.int64)


class JamDocuments(DocumentReader):
    """Low-level dataset of `JamDataset`: documents, their loss flags and retrieved neighbours."""

    def __init__(self, prefix: str, config: JamDatasetConfig) -> None:
        super().__init__(prefix, config.layout, config.mmap_bin_files)
        self.loss_flags = load_sequence_loss(prefix, int(self.seq_lengths.size))
        if config.prompt_loss:
            self.loss_flags = None  # every token trains; the file still marks the prefix as instruction data
        self.neighbors, self.bank = None, None
        found = load_neighbors(prefix, self.num_documents) if config.retrieval is not None else None
        if found is not None:
            self.neighbors, meta = found
            bank = meta["bank"]
            same = os.path.realpath(bank + ".idx") == os.path.realpath(prefix + ".idx")
            self.bank = self if same else DocumentReader(bank, config.layout, config.mmap_bin_files)
        elif config.retrieval is not None:
            log_rank0(logger, "%s has no neighbours file: no retrieval", prefix)
        self.packing = RETRIEVAL if self.neighbors is not None else sample_layout(prefix, config.whole_documents)
        # Megatron packs by these lengths: real lengths, or exactly one sample per document.
        self.sequence_lengths = (self.doc_lengths if self.packing == PACKED
                                 else np.full(self.num_documents, config.sequence_length, dtype=np.int32))
        if self.packing != PACKED:
            log_truncated(prefix, self.doc_lengths, config.sequence_length)

    def weights(self, doc: int, offset: int, length: int) -> np.ndarray:
        """Loss weights of tokens [offset, offset + length) of `doc` (1, or 0 on prompt sequences)."""
        if self.loss_flags is None:
            return np.ones(length, dtype=np.float32)
        a, b = int(self.doc_seq[doc]), int(self.doc_seq[doc + 1])
        per_token = np.repeat(np.asarray(self.loss_flags[a:b], dtype=np.float32), self.seq_lengths[a:b])
        return per_token[offset:offset + length]


class JamDataset(GPTDataset):
    """CM3 multimodal dataset over `JamDocuments` (see the module docstring)."""

    def __init__(self, documents: JamDocuments, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: JamDatasetConfig) -> None:
        super().__init__(documents, dataset_path, indices, num_samples, index_split, config)
        self.masks_and_position_ids_are_cacheable = False  # position ids restart per sample layout
        name = os.path.basename(dataset_path or "")
        self._salt = zlib.crc32(f"{name}|{index_split.name}".encode())

    def _build_document_sample_shuffle_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Megatron's indices (and their on-disk cache), with two JAM rules first: the cache key also says
        how documents are cut into samples (a prefix's layout is not a config field), and a split of no
        tokens is an empty dataset or a one-line error, where Megatron's builder would loop forever asking
        for epochs of 0 tokens."""
        self.unique_identifiers["sample_packing"] = self.dataset.packing
        self.unique_description = json.dumps(self.unique_identifiers, indent=4,
                                             default=lambda obj: obj.unique_identifiers)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8"),
                                                   usedforsecurity=False).hexdigest()
        docs, indices = self.dataset, self.indices
        if self.num_samples == 0 or (indices is not None and not np.sum(docs.sequence_lengths[indices])):
            if self.num_samples:
                raise ConfigError(empty_split_message(self.dataset_path, self.config, docs.num_documents,
                                                      self.index_split, self.num_samples))
            # No samples wanted (0), or one epoch (None) of no documents: an empty dataset, no index built.
            return np.zeros(0, dtype=np.int32), np.zeros((1, 2), dtype=np.int32), np.zeros(0, dtype=np.uint32)
        return super()._build_document_sample_shuffle_indices()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: JamDocuments) -> int:
        """Splits fall on document boundaries."""
        return low_level_dataset.num_documents

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: JamDatasetConfig) -> JamDocuments:
        return JamDocuments(dataset_path, config)

    def rng(self, idx: int) -> np.random.Generator:
        """The generator of sample `idx`: a pure function of (seed, prefix name, split, idx)."""
        return np.random.default_rng([self.config.random_seed, self._salt, int(idx)])

    def raw_sample(self, idx: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens (at most seq_length + 1) and loss weights of sample `idx` before CM3."""
        if self.dataset.packing == RETRIEVAL:
            return self._retrieval_sample(idx, rng)
        if self.dataset.packing == DOCUMENT:
            return self._document_sample(idx)
        return self._packed_sample(idx)

    def _document_sample(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        """Document `idx` of the shuffled order, from its first token, cut at the end (sample_layouts)."""
        doc = int(self.document_index[int(self.sample_index[int(self.shuffle_index[idx])][0])])
        length = min(int(self.dataset.doc_lengths[doc]), self.config.sequence_length + 1)
        return self.dataset.tokens(doc, 0, length), self.dataset.weights(doc, 0, length)

    def _packed_sample(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        i = int(self.shuffle_index[idx])
        (beg, beg_off), (end, end_off) = self.sample_index[i], self.sample_index[i + 1]
        tokens, weights = [], []
        for pos in range(int(beg), int(end) + 1):
            doc = int(self.document_index[pos])
            offset = int(beg_off) if pos == beg else 0
            length = int(end_off) + 1 - offset if pos == end else int(self.dataset.doc_lengths[doc]) - offset
            tokens.append(self.dataset.tokens(doc, offset, length))
            weights.append(self.dataset.weights(doc, offset, length))
        return np.concatenate(tokens), np.concatenate(weights)

    def _retrieval_sample(self, idx: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        cfg, total = self.config.retrieval, self.config.sequence_length + 1
        doc = int(self.document_index[int(self.sample_index[int(self.shuffle_index[idx])][0])])
        length = min(int(self.dataset.doc_lengths[doc]), total)
        query, query_w = self.dataset.tokens(doc, 0, length), self.dataset.weights(doc, 0, length)
        k = int(rng.integers(0, cfg.k + 1)) if cfg.sample_k else cfg.k
        budget, parts = total - length, []
        for nb in [int(n) for n in self.dataset.neighbors[doc] if n >= 0][:k]:
            size = int(self.dataset.bank.doc_lengths[nb])
            if size <= budget:
                parts.append(self.dataset.bank.tokens(nb))
                budget -= size
        nb_len = sum(p.size for p in parts)
        weights = np.concatenate([np.full(nb_len, cfg.loss_weight, dtype=np.float32), query_w])
        return np.concatenate(parts + [query]), weights

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        rng = self.rng(0 if idx is None else idx)
        raw, weights = self.raw_sample(0 if idx is None else idx, rng)
        sample = make_sample(raw, weights, self.config.sequence_length, self.config.layout, self.config.cm3, rng)
        if idx is None:  # Megatron's batch-padding sample: no loss
            sample["loss_mask"].zero_()
        return sample


def split_document_counts(split_matrix, num_documents: int) -> List[int]:
    """Documents of each split (train, valid, test), as Megatron's builder cuts them."""
    return [0 if bounds is None else int(round(bounds[1] * float(num_documents))) -
            int(round(bounds[0] * float(num_documents))) for bounds in split_matrix]


def empty_split_message(prefix: Optional[str], config: JamDatasetConfig, num_documents: int, index_split: Split,
                        num_samples: int) -> str:
    """The one-line error for a split with no documents (or no tokens) from which samples are wanted."""
    counts = split_document_counts(config.split_matrix, num_documents)
    names = ("validation" if s == Split.valid else s.name for s in Split)
    have = ", ".join(f"{n} {c}" for n, c in zip(names, counts))
    name = "validation" if index_split == Split.valid else index_split.name
    count = counts[index_split.value]
    what = f"0 {name} documents" if count == 0 else f"{count} {name} documents of 0 tokens"
    return (f"{prefix}: split {config.split} gives {what} out of {num_documents} ({have}) but "
            f"{num_samples} {name} samples are wanted; use a larger corpus or a split that leaves the "
            f"{name} set at least one document (e.g. --split 90,10,0)")


def make_sample(raw: np.ndarray, weights: np.ndarray, seq_length: int, layout: VocabLayout,
                cm3: Optional[CM3Config], rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """Raw tokens + per-token loss weights -> the sample dict (CM3, padding, shift by one)."""
    total = seq_length + 1
    raw, weights = raw[:total], weights[:total]
    if cm3 is not None and cm3.enabled:
        out = cm3_transform(raw, layout, rng, cm3, max_length=total)
        tokens = out.tokens
        w = np.where(out.source >= 0, weights[np.maximum(out.source, 0)], 1.0).astype(np.float32)
        sentinel = layout.is_sentinel(tokens)
        w[sentinel] *= cm3.sentinel_loss_weight
    else:
        tokens, w = raw, weights.astype(np.float32)
    pad = total - tokens.size
    if pad > 0:
        tokens = np.concatenate([tokens, np.full(pad, layout.eos_id, dtype=np.int64)])
        w = np.concatenate([w, np.zeros(pad, dtype=np.float32)])
    labels = tokens[1:]
    return {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens[:-1], dtype=np.int64)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        "loss_mask": torch.from_numpy(np.ascontiguousarray(w[1:], dtype=np.float32)),
        "position_ids": torch.arange(seq_length, dtype=torch.long),
        "modality": torch.from_numpy(layout.is_image(labels).astype(np.int64)),
    }


def default_is_built_on_rank() -> bool:
    """Megatron-LM's rule: build on tensor-parallel rank 0 (every rank when no model parallelism is set up)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def build_train_valid_test_datasets(
    data_path_blend: Sequence[str], split: str, seq_length: int, seed: int,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]], cm3: Optional[CM3Config], *,
    retrieval: Optional[RetrievalConfig] = None, whole_documents: str = "auto", prompt_loss: bool = False,
    data_cache_path: Optional[str] = None,
    layout: Optional[VocabLayout] = None, is_built_on_rank: Optional[Callable[[], bool]] = None,
    num_dataset_builder_threads: int = 1, mid_level_dataset_surplus: float = 0.005,
    mmap_bin_files: bool = True,
) -> List[Optional[torch.utils.data.Dataset]]:
    """Train, valid and test datasets of a Megatron blend, built through `BlendedMegatronDatasetBuilder`.

    Args:
        data_path_blend: Megatron's `--data-path` list: ``["0.5", "text", "0.5", "imgtext"]`` or prefixes.
        split: Megatron's `--split`, e.g. ``"98,1,1"`` (fractions of each prefix's documents).
        seq_length: tokens per sample (each sample reads seq_length + 1 tokens).
        seed: Megatron's `--seed` (shuffles and the per-sample CM3 / retrieval draws).
        num_samples: samples wanted per split (train_iters x global batch, ...); None = one epoch;
            0 = none (an empty dataset, no index built). A split with no documents from which
            samples are wanted raises `ConfigError` naming the prefix, the split and the counts.
        cm3: the CM3 objective, or None for plain causal LM.
        retrieval: prepend retrieved documents (prefixes with `PREFIX.neighbors.npy`).
        whole_documents: one document per sample for "auto" (instruction prefixes), "always" or "never".
        prompt_loss: train on instruction prompts too (default: responses only, PREFIX.loss_mask.npy).
        data_cache_path: Megatron's `--data-cache-path` for the index cache; default
            `PREFIX/cache/JamDataset_indices` next to each dataset.
        layout: expected vocabulary layout; default the first prefix's (all must match).
        is_built_on_rank: which ranks build datasets (default: tensor-parallel rank 0).
    Returns:
        [train, valid, test]: a `JamDataset` (single prefix), a Megatron `BlendedDataset`, or None.
    """
    blend = get_blend_from_list(list(data_path_blend))
    prefixes = blend[0]
    layout = layout or load_layout(prefixes[0])
    for prefix in prefixes:
        check_dataset_files(prefix)  # before Megatron's builder reads a document (data/integrity.py)
        load_layout(prefix, expected=layout)
    config = JamDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=split, path_to_cache=data_cache_path,
        layout=layout, cm3=cm3, retrieval=retrieval, whole_documents=whole_documents, prompt_loss=prompt_loss,
        num_dataset_builder_threads=num_dataset_builder_threads,
        mid_level_dataset_surplus=mid_level_dataset_surplus, mmap_bin_files=mmap_bin_files)
    builder = BlendedMegatronDatasetBuilder(JamDataset, list(num_samples), is_built_on_rank or default_is_built_on_rank,
                                            config)
    datasets = builder.build()
    log_rank0(logger, "JAM datasets: %s samples (train, valid, test), blend %s, CM3 %s, retrieval %s",
              [None if d is None else len(d) for d in datasets], data_path_blend,
              "on" if cm3 is not None and cm3.enabled else "off", "on" if retrieval else "off")
    return datasets
