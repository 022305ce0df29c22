"""Data: Megatron indexed shards (C++ builder), the shared vocabulary layout, image tokenizers.

`indexed_builder` writes and merges Megatron MMap datasets, `vocab` defines
which id is text, special or image, `documents` turns interleaved documents
into per-modality sequences, `text_tokenizer` loads a sentencepiece model or a
Hugging Face `tokenizer.json`, and `image_tokenizer` wraps a VQ model from
`transformers`. Only the first two are re-exported here: `documents` and
`image_tokenizer` are imported explicitly by the tools that need them, so
readers of the layout never import `transformers`.
"""

from megatron_jam.data.indexed_builder import (
    MODE_IMAGE,
    MODE_TEXT,
    DocumentBatch,
    IndexedDatasetBuilder,
    merge_datasets,
    read_index_header,
)
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, find_layout, load_layout

__all__ = [
    "MODE_IMAGE",
    "MODE_TEXT",
    "DocumentBatch",
    "IndexedDatasetBuilder",
    "merge_datasets",
    "read_index_header",
    "VocabLayout",
    "VocabLayoutError",
    "find_layout",
    "load_layout",
]
