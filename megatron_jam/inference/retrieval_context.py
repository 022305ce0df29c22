"""Retrieval-augmented generation: the prompt retrieves memory-bank documents that are prepended to its context.

Why: the paper's headline samples are retrieval-augmented (section 3.1, RA-CM3 /
CM3leon), and the model was trained on samples laid out as
``[nb_1 ... nb_j, query]`` (`megatron_jam.data.cm3_dataset`, `_retrieval_sample`).
At generation the prompt plays the query, so the same pieces are reused, not
copied: the index and bank written by `tools/build_retrieval_index.py`
(`MipsIndex`, `INDEX.bank.json`), the CLIP embedder of
`megatron_jam.data.clip_embed` (the bank's own model by default), the
selection rule `select_neighbors` (near duplicates above `max_score` and -1s
skipped, first k kept) and the dataset's `DocumentReader` for the bank
documents' tokens.

The query is the prompt text alone, embedded by CLIP's text tower with no query
dropout (dropout regularises training only); candidates are searched by
maximum inner product.

Context budget: generation keeps its full `max_new_tokens` (the caller's
`reserve`); the room left, ``context - len(prompt) - reserve``, takes whole
retrieved documents in retrieval order, best first, as training does: a
document that does not fit is skipped (recorded with the reason) and the next
one is tried; documents are never cut. The context the model sees is
``bank tokens of the kept documents + prompt``; each bank document already ends
with `<eos>`, which separates it from the next one and from the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_MAX_SCORE = 0.9
"""Candidates scoring above this are near duplicates of the prompt (tools/retrieve.py's default)."""


class RetrievalSetupError(ValueError):
    """The retrieval flags or files of a generation run do not fit together (one line, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class RetrievedDocument:
    """One bank document found for a prompt: its bank id, CLIP score, length and tokens (read when prepended)."""

    id: int
    score: float
    length: int
    tokens: Tuple[int, ...] = ()


@dataclasses.dataclass
class RetrievedContext:
    """What retrieval gave one prompt: the documents prepended (in order) and those left out for room."""

    documents: List[RetrievedDocument]
    skipped: List[RetrievedDocument] = dataclasses.field(default_factory=list)

    def prefix_ids(self) -> List[int]:
        """The retrieved documents' tokens, concatenated in retrieval order (what goes before the prompt)."""
        return [t for d in self.documents for t in d.tokens]

    def record(self) -> dict:
        """The JSON summary of the generated document (ids, scores, token counts; the tokens go elsewhere)."""
        return {"ids": [d.id for d in self.documents], "scores": [d.score for d in self.documents],
                "tokens": [d.length for d in self.documents],
                "skipped_no_room": [{"id": d.id, "score": d.score, "tokens": d.length} for d in self.skipped]}


def check_retrieval_args(index: Optional[str], k: Optional[int], max_score: float) -> bool:
    """Whether retrieval is on; raises `RetrievalSetupError` for flags that cannot work (before any model)."""
    if index is None:
        if k:
            raise RetrievalSetupError(f"--retrieval-k {k} needs --retrieval-index INDEX "
                                      "(built by tools/build_retrieval_index.py)")
        return False
    if k is not None and k < 1:
        raise RetrievalSetupError(f"--retrieval-k {k} must be >= 1 with --retrieval-index")
    if max_score < -1.0:
        raise RetrievalSetupError(f"--retrieval-max-score {max_score} < -1 skips every candidate (scores are cosines)")
    return True


def read_bank_meta(index: str) -> dict:
    """INDEX.bank.json (bank prefix, CLIP model), with the index and bank dataset files checked."""
    for path in (index, index + ".json", index + ".bank.json"):
        if not os.path.isfile(path):
            raise RetrievalSetupError(f"--retrieval-index {index}: {path} is missing "
                                      "(build it with tools/build_retrieval_index.py)")
    with open(index + ".bank.json", encoding="utf-8") as f:
        meta = json.load(f)
    bank = meta.get("bank")
    if not bank or not (os.path.isfile(bank + ".idx") and os.path.isfile(bank + ".bin")):
        raise RetrievalSetupError(f"--retrieval-index {index}: its bank dataset {bank} (.idx/.bin) is missing; "
                                  "the bank's tokens are what is prepended")
    return meta


class PromptRetriever:
    """Retrieves bank documents for prompt texts and lays them out in front of the prompt ids."""

    def __init__(self, index: str, k: int, *, layout=None, max_score: float = DEFAULT_MAX_SCORE,
                 clip_model: Optional[str] = None, device: str = "cpu", num_candidates: int = 0) -> None:
        from megatron_jam.data.cm3_dataset import DocumentReader
        from megatron_jam.data.clip_embed import ClipEmbedder
        from megatron_jam.data.retrieval import MipsIndex

        meta = read_bank_meta(index)
        self.index_path, self.k, self.max_score = os.path.abspath(index), int(k), float(max_score)
        self.clip_model = clip_model or meta.get("clip_model")
        if not self.clip_model or not os.path.isdir(self.clip_model):
            raise RetrievalSetupError(f"CLIP model {self.clip_model}: no such folder (pass --clip-model)")
        self.bank_prefix = meta["bank"]
        self.bank = DocumentReader(self.bank_prefix, layout)  # the training dataset's reader; checks the layout
        self.index = MipsIndex.load(index)
        self.candidates = num_candidates or 4 * self.k + 8  # tools/retrieve.py's rule
        self.embedder = ClipEmbedder(self.clip_model, device)
        logger.info("retrieval: %s (%d bank documents, CLIP %s), k=%d, max score %.2f", index,
                    self.bank.num_documents, self.clip_model, self.k, self.max_score)

    def describe(self) -> dict:
        """The run-level settings, for the JSON records."""
        return {"index": self.index_path, "bank": self.bank_prefix, "clip_model": self.clip_model, "k": self.k,
                "max_score": self.max_score}

    def search(self, texts: Sequence[str]) -> List[List[Tuple[int, float]]]:
        """Per text: up to k (bank id, score), best first, near duplicates and -1s skipped."""
        from megatron_jam.data.retrieval import select_neighbors

        if not texts:
            return []
        queries = self.embedder.embed([(t, []) for t in texts])
        scores, ids = self.index.search(queries, min(self.candidates, max(self.index.size, 1)))
        kept = select_neighbors(scores, ids, self.k, max_score=self.max_score)
        return [_with_scores(row, s, i) for row, s, i in zip(kept, scores, ids)]

    def fit(self, found: Sequence[Tuple[int, float]], room: int) -> RetrievedContext:
        """Whole bank documents, in retrieval order, while they fit `room` tokens (a misfit is skipped)."""
        out = RetrievedContext(documents=[])
        for doc, score in found:
            size = int(self.bank.doc_lengths[doc])
            if size > room:
                out.skipped.append(RetrievedDocument(id=int(doc), score=float(score), length=size))
                continue
            tokens = tuple(int(t) for t in self.bank.tokens(doc))
            out.documents.append(RetrievedDocument(id=int(doc), score=float(score), length=size, tokens=tokens))
            room -= size
        return out

    def contexts(self, texts: Sequence[str], prompt_lengths: Sequence[int], context: int,
                 reserve: int) -> List[RetrievedContext]:
        """One `RetrievedContext` per prompt: room = context - prompt length - reserve (tokens to generate)."""
        found = self.search(texts)
        out = [self.fit(f, context - n - reserve) for f, n in zip(found, prompt_lengths)]
        for ctx, f in zip(out, found):
            if ctx.skipped:
                logger.warning("retrieval: %d of %d documents left out (no room in the %d-token context)",
                               len(ctx.skipped), len(f), context)
        return out


def _with_scores(kept: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> List[Tuple[int, float]]:
    """(id, score) of the kept ids, the score of each id's place among the candidates."""
    where = {int(i): float(s) for i, s in zip(ids[::-1], scores[::-1])}  # the best place wins
    return [(int(i), where[int(i)]) for i in kept if i >= 0]


def open_retriever(args, layout) -> Optional[PromptRetriever]:
    """The retriever of a tool's `--retrieval-*` flags, or None when retrieval is off (checks first)."""
    if not check_retrieval_args(args.retrieval_index, args.retrieval_k, args.retrieval_max_score):
        return None
    return PromptRetriever(args.retrieval_index, args.retrieval_k or 2, layout=layout,
                           max_score=args.retrieval_max_score, clip_model=args.retrieval_clip_model)

