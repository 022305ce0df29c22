"""The C++ indexed-dataset builder against Megatron-Core's Python IndexedDatasetBuilder.

Byte identity on randomized documents (hypothesis: dtypes, empty and one-token
sequences, modes), read-back through Megatron-Core's IndexedDataset, streaming
merge == one build == Megatron's add_index, range checks, atomic publication.
"""

import filecmp
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MegatronBuilder

from megatron_jam.data.indexed_builder import (DocumentBatch, IndexedDatasetBuilder, merge_datasets,
                                               read_index_header)

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64]


def value_range(dtype):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    return -(2 ** 24), 2 ** 24  # integers exactly representable in float32


@st.composite
def corpora(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = value_range(dtype)
    special = st.sampled_from([lo, hi, 0]) if lo < 0 else st.sampled_from([lo, hi])
    token = st.one_of(st.integers(lo, hi), special)
    sequence = st.tuples(st.lists(token, min_size=0, max_size=6), st.integers(0, 1))
    documents = st.lists(st.lists(sequence, min_size=0, max_size=4), min_size=0, max_size=8)
    return dtype, draw(documents), draw(st.booleans()), draw(st.booleans())


def write_both(folder, dtype, documents, multimodal, use_items):
    """Build the same documents with Megatron-Core and with ours; return the two prefixes."""
    prefixes = []
    for name, cls in (("megatron", MegatronBuilder), ("jam", IndexedDatasetBuilder)):
        prefix = os.path.join(folder, name)
        builder = cls(prefix + ".bin", dtype=dtype, multimodal=multimodal)
        for doc in documents:
            if use_items:
                for tokens, mode in doc:
                    builder.add_item(torch.tensor(tokens, dtype=torch.int64), mode)
                builder.end_document()
            else:
                flat = np.array([t for tokens, _ in doc for t in tokens], dtype=np.int64)
                builder.add_document(flat, [len(t) for t, _ in doc], [m for _, m in doc])
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


def assert_identical(a, b):
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(a + ext, b + ext, shallow=False), f"{ext} differs"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora())
def test_byte_identical_to_megatron(case):
    dtype, documents, multimodal, use_items = case
    with tempfile.TemporaryDirectory() as folder:
        megatron, jam = write_both(folder, dtype, documents, multimodal, use_items)
        assert_identical(megatron, jam)
        flat = [(tokens, mode) for doc in documents for tokens, mode in doc]
        if not any(tokens for tokens, _ in flat):
            return  # Megatron-Core's reader cannot mmap an empty .bin (the files are still identical)
        ds = IndexedDataset(jam, multimodal=multimodal)
        assert len(ds) == len(flat) and len(ds.document_indices) == len(documents) + 1
        for i, (tokens, mode) in enumerate(flat):
            got = ds[i]
            values, got_mode = got if multimodal else (got, None)
            np.testing.assert_array_equal(values, np.array(tokens, dtype=dtype))
            assert got_mode is None or got_mode == mode


def random_documents(rng, n, vocab=60000, max_seqs=3, max_len=50):
    docs = []
    for _ in range(n):
        lengths = rng.integers(0, max_len, size=rng.integers(1, max_seqs + 1))
        docs.append((rng.integers(0, vocab, size=int(lengths.sum())), lengths, rng.integers(0, 2, size=lengths.size)))
    return docs


def build(prefix, docs, dtype=np.uint16, multimodal=True):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype, multimodal=multimodal)
    for tokens, lengths, modes in docs:
        builder.add_document(tokens, lengths, modes)
    builder.finalize(prefix + ".idx")
    return prefix


def test_batch_api_matches_per_document(tmp_path):
    docs = random_documents(np.random.default_rng(1), 200)
    one = build(str(tmp_path / "one"), docs)
    batch = DocumentBatch(np.concatenate([d[0] for d in docs]), np.concatenate([d[1] for d in docs]),
                          np.array([d[1].size for d in docs]), np.concatenate([d[2] for d in docs]).astype(np.int8))
    head, tail = batch.split(77)
    assert head.num_documents == 77 and tail.num_documents == 123
    builder = IndexedDatasetBuilder(str(tmp_path / "two.bin"), dtype=np.uint16, multimodal=True)
    builder.add_batch(head)
    builder.add_batch(tail)
    builder.finalize(str(tmp_path / "two.idx"))
    assert_identical(one, str(tmp_path / "two"))


@pytest.mark.parametrize("multimodal", [True, False])
def test_merge_many_shards_equals_one_build(tmp_path, multimodal, monkeypatch):
    monkeypatch.setattr("gc.collect", lambda *a: 0)  # Megatron's add_index collects per shard: slow, irrelevant
    rng = np.random.default_rng(0)
    shards = [random_documents(rng, int(rng.integers(0, 6))) for _ in range(25)]
    single = build(str(tmp_path / "single"), [d for s in shards for d in s], multimodal=multimodal)
    prefixes = [build(str(tmp_path / f"shard_{i:05d}"), s, multimodal=multimodal) for i, s in enumerate(shards)]
    stats = merge_datasets(prefixes, str(tmp_path / "merged"), chunk_elements=3)  # many chunk boundaries
    assert stats == {"sequences": sum(d[1].size for s in shards for d in s),
                     "documents": sum(len(s) for s in shards), "tokens": sum(d[0].size for s in shards for d in s),
                     "multimodal": multimodal}
    assert_identical(single, str(tmp_path / "merged"))
    for cls, name in ((MegatronBuilder, "megatron"), (IndexedDatasetBuilder, "add_index")):
        builder = cls(str(tmp_path / f"{name}.bin"), dtype=np.uint16, multimodal=multimodal)
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(str(tmp_path / f"{name}.idx"))
        assert_identical(single, str(tmp_path / name))


@pytest.mark.parametrize("dtype,bad", [(np.uint16, 65536), (np.uint16, -1), (np.int8, 128), (np.uint8, 256),
                                       (np.int32, 2 ** 31), (np.int16, 1.5)])
def test_out_of_range_ids_raise_and_write_nothing(tmp_path, dtype, bad):
    good = np.array([1, 2, 3])
    reference = build(str(tmp_path / "ref"), [(good, np.array([3]), np.array([0]))], dtype=dtype)
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=dtype, multimodal=True)
    builder.add_document(good, [3], [0])
    with pytest.raises(ValueError, match="not an integer in the range of dtype"):
        builder.add_document(np.array([5, bad, 7]), [3], [0])
    with pytest.raises(ValueError, match="not an integer in the range"):
        builder.add_item(np.array([bad]))
    assert not os.path.exists(tmp_path / "x.bin")  # nothing that looks like a dataset yet
    builder.finalize(str(tmp_path / "x.idx"))
    assert_identical(reference, str(tmp_path / "x"))


def test_inconsistent_lengths_and_modes_raise(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16, multimodal=True)
    with pytest.raises(ValueError, match="sum to 4 but 3 tokens"):
        builder.add_document(np.array([1, 2, 3]), [2, 2], [0, 1])
    with pytest.raises(ValueError, match="1 modes for 2 sequences"):
        builder.add_document(np.array([1, 2, 3]), [2, 1], [0])
    with pytest.raises(ValueError, match="does not fit int8"):
        builder.add_item(np.array([1]), mode=300)
    assert builder.num_documents == 0 and builder.num_tokens == 0


def test_unfinished_builder_leaves_no_files(tmp_path):
    complete = build(str(tmp_path / "d"), [(np.array([1, 2]), np.array([2]), np.array([0]))])
    before = open(complete + ".idx", "rb").read()
    builder = IndexedDatasetBuilder(complete + ".bin", dtype=np.uint16, multimodal=True)
    builder.add_document(np.arange(10), [10], [1])
    del builder  # interrupted: the temporary .bin is removed, the old dataset is untouched
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert open(complete + ".idx", "rb").read() == before
    with IndexedDatasetBuilder(complete + ".bin", dtype=np.uint16) as b:
        b.add_item(np.arange(4))
        b.end_document()
        b.finalize(complete + ".idx")
    assert read_index_header(complete + ".idx")["sequence_count"] == 1


def test_merge_rejects_bad_shards(tmp_path):
    a = build(str(tmp_path / "a"), [(np.array([1, 2]), np.array([2]), np.array([0]))])
    b = build(str(tmp_path / "b"), [(np.array([1, 2]), np.array([2]), np.array([0]))], dtype=np.int32)
    with pytest.raises(ValueError, match="b.idx: dtype int32 differs"):
        merge_datasets([a, b], str(tmp_path / "m"))
    c = build(str(tmp_path / "c"), [(np.array([1, 2]), np.array([2]), np.array([0]))], multimodal=False)
    with pytest.raises(ValueError, match="some shards have sequence modes and some do not"):
        merge_datasets([a, c], str(tmp_path / "m"))
    with open(a + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="a.bin: 6 bytes, index says 4"):
        merge_datasets([a], str(tmp_path / "m"))
    with open(c + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="c.idx: size 40 bytes"):
        merge_datasets([c], str(tmp_path / "m"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("m")]
