"""Retrieval augmentation: the MIPS index, neighbour selection, the two tools with a tiny random CLIP,
and the layout of a retrieval-augmented sample.

Nothing is downloaded: the CLIP model is a random 2-layer `CLIPModel` with a
character-level tokenizer saved in the test (the `tiny_clip` fixture of tests/conftest.py).
"""

import json
import os
import sys

import numpy as np
import pytest

from jam_data_helpers import LAYOUT, text_only_corpus, write_dataset
from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets
from megatron_jam.data.retrieval import (MipsIndex, RetrievalConfig, have_faiss, load_neighbors, normalize_rows,
                                         save_neighbors, select_neighbors)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import build_retrieval_index  # noqa: E402
import retrieve  # noqa: E402

L = LAYOUT


def planted(rng, n=3000, d=32):
    bank = normalize_rows(rng.standard_normal((n, d)))
    q = bank[0]
    near = normalize_rows(q + 0.6 * normalize_rows(rng.standard_normal(d)))  # cosine ~0.86: close, not a duplicate
    bank[7], bank[8] = near, q  # 8 duplicates the query document 0
    return bank, float(near @ q)


@pytest.mark.parametrize("kind", ["flat", "ivf", "numpy"])
def test_index_returns_planted_neighbour_and_drops_duplicate(kind, monkeypatch):
    if kind == "numpy":
        monkeypatch.setattr("megatron_jam.data.retrieval.have_faiss", lambda: False)
    rng = np.random.default_rng(0)
    bank, score = planted(rng)
    assert score <= 0.9
    index = MipsIndex.build(bank, kind="flat" if kind == "numpy" else kind, nlist=16, nprobe=16)
    scores, ids = index.search(bank[:1], 5)
    assert set(ids[0, :3].tolist()) == {0, 8, 7} and scores[0, 0] > 0.999
    nb = select_neighbors(scores, ids, 2, query_ids=np.array([0]), max_score=0.9)
    assert nb[0, 0] == 7 and 8 not in nb[0] and 0 not in nb[0]  # duplicate and self dropped


def test_numpy_fallback_matches_faiss(tmp_path, monkeypatch):
    assert have_faiss(), "faiss-cpu is a test dependency (setup.py extras 'test')"
    rng = np.random.default_rng(1)
    bank, q = rng.standard_normal((500, 16)), rng.standard_normal((20, 16))
    want = MipsIndex.build(bank, kind="flat").search(q, 10)
    want_index = MipsIndex.build(bank, kind="flat")
    want_index.save(str(tmp_path / "f.index"))
    np.testing.assert_array_equal(MipsIndex.load(str(tmp_path / "f.index")).search(q, 10)[1], want[1])
    monkeypatch.setattr("megatron_jam.data.retrieval.have_faiss", lambda: False)
    got = MipsIndex.build(bank, kind="flat").search(q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_select_neighbors_rules():
    ids = np.array([[3, 1, 4, 5, -1], [0, 2, 1, -1, -1]])
    scores = np.array([[0.95, 0.8, 0.7, 0.6, 0], [0.99, 0.5, 0.4, 0, 0]], dtype=np.float32)
    out = select_neighbors(scores, ids, 3, query_ids=np.array([1, 2]), max_score=0.9)
    assert out.tolist() == [[4, 5, -1], [1, -1, -1]]


# ------------------------------------------------------------------ tools, tiny CLIP
@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    """12 source documents (text, some with images); document 5 is an exact copy of document 2."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bank")
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "tree", "house", "river", "sky", "red", "blue", "green", "small", "big", "stone"]
    records = []
    for i in range(12):
        content = [{"text": " ".join(rng.choice(words, 6))}]
        if i % 3 == 0:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
            content.append({"image": f"{i}.png"})
        records.append({"content": content})
    records[5] = records[2]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prefix = write_dataset(root / "bank", text_only_corpus(rng, 12))  # stands for the preprocessed shards
    (root / "bank.stats.json").write_text(json.dumps({"inputs": [str(root / "docs.jsonl")]}))
    return prefix


def test_tools_exclude_self_and_duplicates(tiny_clip, bank, tmp_path):
    index = str(tmp_path / "bank.faiss")
    assert build_retrieval_index.main(["--data-path", bank, "--clip-model", tiny_clip, "--output", index,
                                       "--no-progress-bar", "--embed-shard-size", "5"]) == 0
    assert sorted(os.listdir(index + ".emb")) == ["emb_00000.npy", "emb_00001.npy", "emb_00002.npy"]
    # no diversity filter, no dropout: the exact copy is the nearest neighbour, the document itself never
    assert retrieve.main(["--data-path", bank, "--index", index, "--num-neighbors", "3", "--max-score", "1.01",
                          "--query-dropout", "0", "--no-progress-bar"]) == 0
    nb, meta = load_neighbors(bank, 12)
    assert nb[2, 0] == 5 and nb[5, 0] == 2 and meta["self_excluded"]
    assert all(i not in nb[i] for i in range(12))
    # defaults: duplicates above 0.9 skipped, 20% query dropout
    assert retrieve.main(["--data-path", bank, "--index", index, "--num-neighbors", "3", "--no-progress-bar"]) == 0
    nb, _ = load_neighbors(bank, 12)
    assert 5 not in nb[2] and 2 not in nb[5] and all(i not in nb[i] for i in range(12))
    # resume: embedding shards on disk are reused
    assert build_retrieval_index.main(["--data-path", bank, "--clip-model", tiny_clip, "--output", index,
                                       "--no-progress-bar", "--embed-shard-size", "5"]) == 0


def test_document_count_mismatch_is_an_error(tiny_clip, bank, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(open(os.path.join(os.path.dirname(bank), "docs.jsonl")).readlines()[:5]))
    with pytest.raises(ValueError, match="5 documents but the dataset has 12"):
        build_retrieval_index.main(["--data-path", bank, "--input", str(short), "--clip-model", tiny_clip,
                                    "--output", str(tmp_path / "x.faiss"), "--no-progress-bar"])


def test_prepended_sample_layout(tmp_path, single_rank):
    rng = np.random.default_rng(2)
    bank = write_dataset(tmp_path / "bank", text_only_corpus(rng, 10, lo=10, hi=20))
    query = write_dataset(tmp_path / "query", text_only_corpus(rng, 30, lo=20, hi=40))
    neighbors = np.array([[(i + 1) % 10, (i + 2) % 10, (i + 3) % 10] for i in range(30)])
    neighbors[4] = [-1, -1, -1]
    save_neighbors(query, neighbors, {"bank": bank})
    train, _, _ = build_train_valid_test_datasets([query], "100,0,0", 64, 1, (60, None, None), None,
                                                  retrieval=RetrievalConfig(k=2, loss_weight=0.5),
                                                  data_cache_path=str(tmp_path / "c"))
    from megatron_jam.data.cm3_dataset import DocumentReader

    b, q = DocumentReader(bank, L), DocumentReader(query, L)
    docs = set()
    for i in range(len(train)):
        s = train[i]
        doc = int(train.document_index[train.sample_index[train.shuffle_index[i]][0]])
        docs.add(doc)
        parts = [b.tokens(n) for n in neighbors[doc][:2] if n >= 0]
        fits = []
        for p in parts:  # neighbours in rank order, each whole, while they fit before the query
            if sum(x.size for x in fits) + p.size + q.doc_lengths[doc] <= 65:
                fits.append(p)
        want = np.concatenate(fits + [q.tokens(doc)])
        nb_len = want.size - q.doc_lengths[doc]
        got = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        np.testing.assert_array_equal(got[:want.size], want)
        w = np.concatenate([[np.nan], s["loss_mask"].numpy()])
        assert (w[1:nb_len] == 0.5).all() and (w[max(nb_len, 1):want.size] == 1).all() and (w[want.size:] == 0).all()
    assert docs == set(range(30))  # one query document per sample, every document once per epoch
