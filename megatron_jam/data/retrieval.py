"""Retrieval augmentation: the MIPS index, neighbour selection and the neighbour files the dataset reads.

Why here and not in the tools: `tools/build_retrieval_index.py`,
`tools/retrieve.py`, the dataset and the tests share the index wrapper, the
selection rule and the file formats (paper section 3.1, DESIGN.md section 6).
CLIP embedding lives in :mod:`megatron_jam.data.clip_embed` so that the
dataset never imports `transformers`.

Index (`MipsIndex`): FAISS inner product on L2-normalised float32 vectors
(scores are cosine similarities in [-1, 1]). `kind="flat"` is exact;
`kind="ivf"` is `IndexIVFFlat` with `nlist` inverted lists trained on up to
`256 * nlist` vectors and `nprobe` lists searched per query; `kind="auto"`
picks flat below `ivf_threshold` (100,000) vectors. Without the `faiss`
module (`pip install faiss-cpu`, extra `retrieval`) only `flat` works, as an
exact numpy matrix product behind the same interface.

Selection (`select_neighbors`): candidates come best first; a candidate is
skipped when it is the query document itself (same bank id, when the queries
are the bank), when its score is above `max_score` (0.9: a near duplicate of
the query, skipped for diversity), or when it is -1 (FAISS's "no result");
the first `k` survivors are kept, the row is padded with -1.

Files: `QUERY_PREFIX.neighbors.npy` (int64 [documents, k], bank document ids,
-1 = none) and `QUERY_PREFIX.neighbors.json` (bank prefix, k, scores
threshold, query dropout, seed, index), written by `tools/retrieve.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

NEIGHBORS_SUFFIX = ".neighbors.npy"
NEIGHBORS_META_SUFFIX = ".neighbors.json"
DEFAULT_IVF_THRESHOLD = 100_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    """How the dataset prepends retrieved documents."""

    k: int = 3
    """Most retrieved documents prepended per sample (CM3leon keeps up to 3)."""
    sample_k: bool = False
    """Draw the number per sample uniformly from {0, ..., k} (RA-CM3 samples K in {0, 1, 2})."""
    loss_weight: float = 1.0
    """Loss weight of the retrieved documents' tokens (the query document's tokens weigh 1)."""

    def __post_init__(self) -> None:
        if self.k < 0 or self.loss_weight < 0:
            raise ValueError(f"RetrievalConfig: k and loss_weight must be >= 0, got {self.k}, {self.loss_weight}")


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class MipsIndex:
    """Maximum-inner-product search over normalised embeddings (FAISS, or exact numpy)."""

    def __init__(self, dim: int, kind: str = "flat", nlist: int = 0, nprobe: int = 16) -> None:
        if kind not in ("flat", "ivf"):
            raise ValueError(f"index kind must be flat or ivf, got {kind!r}")
        if kind == "ivf" and not have_faiss():
            raise RuntimeError("an IVF index needs faiss (pip install faiss-cpu)")
        self.dim, self.kind, self.nlist, self.nprobe = dim, kind, nlist, nprobe
        self._vectors: Optional[np.ndarray] = None  # numpy fallback
        self._index: Any = None
        if have_faiss():
            import faiss

            if kind == "flat":
                self._index = faiss.IndexFlatIP(dim)
            else:
                self._index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)

    @classmethod
    def build(cls, embeddings: np.ndarray, kind: str = "auto", nlist: Optional[int] = None, nprobe: int = 16,
              ivf_threshold: int = DEFAULT_IVF_THRESHOLD, seed: int = 0) -> "MipsIndex":
        """An index over `embeddings` ([N, d], normalised here); `kind` auto = flat below `ivf_threshold`."""
        x = normalize_rows(embeddings)
        n, dim = x.shape
        if kind == "auto":
            kind = "ivf" if n >= ivf_threshold and have_faiss() else "flat"
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
        index = cls(dim, kind, nlist, nprobe)
        if kind == "ivf":
            rng = np.random.default_rng(seed)
            train = x if n <= 256 * nlist else x[rng.choice(n, 256 * nlist, replace=False)]
            index._index.train(train)
        index.add(x)
        return index

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(normalize_rows(x))
        if self._index is not None:
            self._index.add(x)
        else:
            self._vectors = x if self._vectors is None else np.concatenate([self._vectors, x])

    @property
    def size(self) -> int:
        if self._index is not None:
            return int(self._index.ntotal)
        return 0 if self._vectors is None else int(self._vectors.shape[0])

    def search(self, queries: np.ndarray, k: int, batch: int = 4096) -> Tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, ids [Q, k] int64), best first; -1 ids when fewer than k exist."""
        q = np.ascontiguousarray(normalize_rows(np.atleast_2d(queries)))
        if self._index is not None:
            if self.kind == "ivf":
                self._index.nprobe = self.nprobe
            scores, ids = self._index.search(q, k)
            return scores.astype(np.float32), ids.astype(np.int64)
        return self._numpy_search(q, k, batch)

    def _numpy_search(self, q: np.ndarray, k: int, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        n = self.size
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((q.shape[0], k), -1, dtype=np.int64)
        kk = min(k, n)
        for b in range(0, q.shape[0], batch):
            sim = q[b:b + batch] @ self._vectors.T
            top = np.argpartition(-sim, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (sim.shape[0], 1))
            top_scores = np.take_along_axis(sim, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            ids[b:b + batch, :kk] = np.take_along_axis(top, order, axis=1)
            scores[b:b + batch, :kk] = np.take_along_axis(top_scores, order, axis=1)
        return scores, ids

    def save(self, path: str) -> None:
        """Write the index (`path`, a FAISS file or an .npy of vectors) and `path.json` metadata."""
        meta = {"dim": self.dim, "kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe,
                "size": self.size, "backend": "faiss" if self._index is not None else "numpy"}
        if self._index is not None:
            import faiss

            faiss.write_index(self._index, path)
        else:
            with open(path, "wb") as f:
                np.save(f, self._vectors)
        with open(path + ".json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, path: str) -> "MipsIndex":
        with open(path + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        index = cls.__new__(cls)
        index.dim, index.kind, index.nlist, index.nprobe = meta["dim"], meta["kind"], meta["nlist"], meta["nprobe"]
        index._vectors, index._index = None, None
        if meta["backend"] == "faiss":
            import faiss

            index._index = faiss.read_index(path)
        else:
            index._vectors = np.load(path)
        return index


def select_neighbors(scores: np.ndarray, ids: np.ndarray, k: int, query_ids: Optional[np.ndarray] = None,
                     max_score: float = 0.9, duplicate_scores: Optional[np.ndarray] = None) -> np.ndarray:
    """First k candidates per row that are not the query itself, not above `max_score`, not -1.

    Args:
        scores, ids: [Q, C] search results, best first.
        k: neighbours to keep per query.
        query_ids: [Q] bank id of each query when the queries are bank documents (self-exclusion).
        max_score: candidates scoring strictly above it are near duplicates and skipped.
        duplicate_scores: [Q, C] scores to judge near duplicates by, instead of `scores` (tools/retrieve.py
            passes the *clean* query's scores: query dropout must not hide a duplicate).
    Returns:
        [Q, k] int64 bank ids, -1 where fewer than k candidates survived.
    """
    ids = np.asarray(ids, dtype=np.int64)
    judge = scores if duplicate_scores is None else duplicate_scores
    keep = (ids >= 0) & (np.asarray(judge) <= max_score)
    if query_ids is not None:
        keep &= ids != np.asarray(query_ids, dtype=np.int64)[:, None]
    rank = np.cumsum(keep, axis=1) - 1
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    rows, cols = np.nonzero(keep & (rank < k))
    out[rows, rank[rows, cols]] = ids[rows, cols]
    return out


class EmbeddingShards:
    """The bank embeddings saved by tools/build_retrieval_index.py (`INDEX.emb/emb_*.npy`), memory-mapped."""

    def __init__(self, folder: str) -> None:
        names = sorted(n for n in os.listdir(folder) if n.startswith("emb_") and n.endswith(".npy"))
        self.shards = [np.load(os.path.join(folder, n), mmap_mode="r") for n in names]
        self.starts = np.cumsum([0] + [s.shape[0] for s in self.shards])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (any shape, -1 gives zeros) -> [..., d] float32."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros(ids.shape + (self.shards[0].shape[1],), dtype=np.float32)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(shard[ids >= 0]).tolist():
            sel = (shard == s) & (ids >= 0)
            out[sel] = self.shards[s][ids[sel] - self.starts[s]]
        return out


def neighbors_path(prefix: str) -> str:
    return prefix + NEIGHBORS_SUFFIX


def save_neighbors(prefix: str, neighbors: np.ndarray, meta: Dict[str, Any]) -> None:
    """Write `prefix.neighbors.npy` and `.json` (the .npy last, atomically)."""
    with open(prefix + NEIGHBORS_META_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    tmp = f"{neighbors_path(prefix)}.tmp-{os.getpid()}.npy"
    np.save(tmp, np.asarray(neighbors, dtype=np.int64))
    os.replace(tmp, neighbors_path(prefix))


def load_neighbors(prefix: str, num_documents: int) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
    """(neighbours [documents, k], metadata) of `prefix`, or None when it has no neighbour file."""
    if not os.path.exists(neighbors_path(prefix)):
        return None
    neighbors = np.load(neighbors_path(prefix), mmap_mode="r")
    with open(prefix + NEIGHBORS_META_SUFFIX, encoding="utf-8") as f:
        meta = json.load(f)
    if neighbors.ndim != 2 or neighbors.shape[0] != num_documents:
        raise ValueError(f"{neighbors_path(prefix)}: shape {neighbors.shape} for {num_documents} documents")
    return neighbors, meta



def needs_neighbors(prefix: str) -> bool:
    """Whether a retrieval-augmented run retrieves for `prefix`: image-text data, as the paper does.

    Why this rule (paper section 3.1 and 2.2): the retrieval is multimodal (RA-CM3) and the paper
    retrieves for the image-text (Shutterstock) data in both phases; its text corpora and its
    instruction data are not said to be retrieval-augmented. So a prefix with no image sequence
    (text-only) or with an instruction loss mask (`PREFIX.loss_mask.npy`) is trained without retrieval.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jam.data.indexed_builder import MODE_IMAGE
    from megatron_jam.data.instruct import loss_mask_path

    if os.path.exists(loss_mask_path(prefix)):
        return False
    dataset = IndexedDataset(prefix, multimodal=True, mmap=True)  # kept alive: the modes are a view of its mmap
    return bool(np.any(np.asarray(dataset.index.sequence_modes) == MODE_IMAGE))


def missing_neighbors(prefixes, optional=()) -> list:
    """The prefixes of a training blend that `needs_neighbors` but that have no neighbours file, except
    those in `optional`.

    Why: a retrieval-augmented run (`--retrieval-k`) whose neighbours were never written for an image-text
    prefix would silently train it without retrieval; the trainer names it instead.
    """
    skipped = {os.path.abspath(p) for p in optional}
    return [p for p in prefixes if os.path.abspath(p) not in skipped and not os.path.exists(neighbors_path(p))
            and needs_neighbors(p)]
