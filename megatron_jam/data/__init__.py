"""Data: Megatron indexed shards (C++ builder), the shared vocabulary layout, image tokenizers.

`indexed_builder` writes and merges Megatron MMap datasets, `vocab` defines
which id is text, special or image, `documents` turns interleaved documents
into per-modality sequences, and `image_tokenizer` wraps a VQ model from
`transformers`. Submodules are imported lazily so that light users (the
layout, the builder) do not pay for torch/transformers.
"""

from megatron_jam.data.indexed_builder import (  # noqa: F401
    MODE_IMAGE,
    MODE_TEXT,
    DocumentBatch,
    IndexedDatasetBuilder,
    merge_datasets,
    read_index_header,
)
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, find_layout, load_layout  # noqa: F401
