"""CLIP document embeddings for retrieval, and the source documents behind a dataset's shards.

Why embed from the source JSONL and not from the shards: CLIP needs pixels and
the shards hold VQ codes (the VQ models we load only encode). The documents of
a dataset written by `tools/preprocess_interleaved.py` are exactly the
non-blank input lines, in order, minus the lines listed in
`PREFIX.rejects.jsonl`; `PREFIX.stats.json` names the inputs. `source_documents`
replays that and checks the count against the `.idx`, so embedding i belongs
to document i.

A document's embedding (paper section 3.1; RA-CM3): the text items joined with
spaces go through CLIP's text tower (truncated to its context), each image
file through the vision tower; each embedding is L2-normalised, the image
embeddings are averaged, text and image are averaged, and the result is
normalised again. Images given only as `image_tokens` cannot be embedded
(no pixels) and are ignored; a document with neither text nor image files
gets a zero vector (it can still be retrieved, with score 0).

Query dropout (`dropout > 0`, used by `tools/retrieve.py` for the queries
only): a fraction of the text tokens (BOS/EOS kept) is removed, and the same
fraction of the vision patches is set to 0 (the normalised mean pixel) before
the towers run; the draws are seeded by (seed, document index).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_jam.data.documents import IMAGE, TEXT, RejectedDocument, content_items


def source_documents(prefix: str, inputs: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(input file, record) of every document of dataset `prefix`, in document order.

    `inputs` defaults to the list in `PREFIX.stats.json`; lines in
    `PREFIX.rejects.jsonl` are skipped, as preprocessing skipped them.
    """
    if inputs is None:
        with open(prefix + ".stats.json", encoding="utf-8") as f:
            inputs = json.load(f)["inputs"]
    rejected = set()
    if os.path.exists(prefix + ".rejects.jsonl"):
        with open(prefix + ".rejects.jsonl", encoding="utf-8") as f:
            rejected = {(r["file"], r["line"]) for r in map(json.loads, f)}
    for path in inputs:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip() and (path, number) not in rejected:
                    yield path, json.loads(raw)


def document_views(record: Dict[str, Any], folder: str, json_keys: Sequence[str] = ("text",)) -> Tuple[str, List[str]]:
    """(text, image paths) of a source record: what CLIP sees of the document."""
    try:
        items = content_items(record, json_keys)
    except RejectedDocument:
        return "", []
    text = " ".join(v for kind, v in items if kind == TEXT)
    images = [v if os.path.isabs(v) else os.path.join(folder, v) for kind, v in items if kind == IMAGE]
    return text, images


class ClipEmbedder:
    """A local `transformers` CLIP model (+ processor) that embeds (text, image files) documents."""

    def __init__(self, model_dir: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch = torch
        self.model = CLIPModel.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
        _reset_position_ids(self.model, torch)
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.device = device
        self.max_text = int(self.model.config.text_config.max_position_embeddings)
        self.patch = int(self.model.config.vision_config.patch_size)
        self.dim = int(self.model.config.projection_dim)
        self.identity = f"clip:{os.path.basename(os.path.abspath(model_dir))}"

    @staticmethod
    def _features(out: Any) -> Any:
        return out if hasattr(out, "shape") else out.pooler_output

    def _text(self, texts: List[str], rngs: List[np.random.Generator], dropout: float) -> np.ndarray:
        tok = self.processor.tokenizer
        ids = tok(texts, truncation=True, max_length=self.max_text)["input_ids"]
        if dropout > 0:
            ids = [_drop_inner(seq, rng, dropout) for seq, rng in zip(ids, rngs)]
        batch = tok.pad({"input_ids": ids}, return_tensors="pt")
        with self.torch.no_grad():
            out = self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                               attention_mask=batch["attention_mask"].to(self.device))
        return self._features(out).float().cpu().numpy()

    def _images(self, paths: List[str], rngs: List[np.random.Generator], dropout: float) -> np.ndarray:
        from PIL import Image

        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if dropout > 0:
            pixels = _drop_patches(pixels, self.patch, rngs, dropout)
        with self.torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return self._features(out).float().cpu().numpy()

    def embed(self, docs: List[Tuple[str, List[str]]], dropout: float = 0.0,
              seeds: Optional[List[int]] = None) -> np.ndarray:
        """[len(docs), dim] float32 unit vectors of (text, image paths) documents."""
        seeds = seeds if seeds is not None else list(range(len(docs)))
        rngs = [np.random.default_rng([s, 1]) for s in seeds]
        out = np.zeros((len(docs), self.dim), dtype=np.float32)
        text_rows = [i for i, (t, _) in enumerate(docs) if t.strip()]
        text = _unit(self._text([docs[i][0] for i in text_rows], [rngs[i] for i in text_rows], dropout)) \
            if text_rows else np.zeros((0, self.dim), np.float32)
        img_rows = [i for i, (_, ims) in enumerate(docs) for _ in ims]
        img_paths = [p for _, ims in docs for p in ims]
        images = _unit(self._images(img_paths, [rngs[i] for i in img_rows], dropout)) \
            if img_paths else np.zeros((0, self.dim), np.float32)
        count = np.zeros(len(docs), dtype=np.float32)
        image_sum = np.zeros_like(out)
        np.add.at(image_sum, np.asarray(img_rows, dtype=np.int64), images)
        np.add.at(count, np.asarray(img_rows, dtype=np.int64), 1.0)
        has_img = count > 0
        image_mean = _unit(image_sum / np.maximum(count, 1)[:, None])
        out[text_rows] += text
        out[has_img] += image_mean[has_img]
        return _unit(out)


def _reset_position_ids(model: Any, torch: Any) -> None:
    """Refill the non-persistent `position_ids` buffers (arange): transformers 5.x `from_pretrained`
    was seen leaving them uninitialised on CPU, which gives garbage positions or an IndexError."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor):
            with torch.no_grad():
                ids.copy_(torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _drop_inner(ids: List[int], rng: np.random.Generator, fraction: float) -> List[int]:
    """Remove `fraction` of the tokens between the first and the last one (BOS/EOS)."""
    inner = ids[1:-1]
    drop = int(round(fraction * len(inner)))
    if drop == 0:
        return list(ids)
    removed = set(rng.choice(len(inner), drop, replace=False).tolist())
    return [ids[0]] + [t for j, t in enumerate(inner) if j not in removed] + [ids[-1]]


def _drop_patches(pixels: Any, patch: int, rngs: List[np.random.Generator], fraction: float) -> Any:
    """Zero `fraction` of the patch cells of each image ([n, 3, H, W] torch tensor)."""
    pixels = pixels.clone()
    gh, gw = pixels.shape[2] // patch, pixels.shape[3] // patch
    drop = int(round(fraction * gh * gw))
    for b, rng in enumerate(rngs):
        for cell in rng.choice(gh * gw, drop, replace=False).tolist():
            r, c = divmod(cell, gw)
            pixels[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0
    return pixels


def embed_dataset(prefix: str, embedder: ClipEmbedder, *, inputs: Optional[Sequence[str]] = None,
                  json_keys: Sequence[str] = ("text",), batch_size: int = 64, dropout: float = 0.0, seed: int = 0,
                  shard_dir: Optional[str] = None, shard_size: int = 100_000, progress: bool = True) -> np.ndarray:
    """[documents, dim] embeddings of every document of dataset `prefix` (see `source_documents`).

    With `shard_dir`, every `shard_size` documents are saved as `emb_00000.npy`, ... and shards
    already there are loaded instead of recomputed, so an interrupted run resumes.
    """
    from megatron_jam.data.indexed_builder import read_index_header
    from megatron_jam.utils.progress import progress as progress_bar

    total = int(read_index_header(prefix + ".idx")["document_count"]) - 1
    bar = progress_bar(total=total, desc="embedding", unit="doc", enabled=progress)
    shards: List[np.ndarray] = []
    pending: List[Tuple[str, List[str]]] = []
    count = 0
    for path, record in source_documents(prefix, inputs):
        shard_file = os.path.join(shard_dir, f"emb_{len(shards):05d}.npy") if shard_dir else None
        count += 1
        if shard_file and os.path.exists(shard_file):
            if count % shard_size == 0 or count == total:
                shards.append(np.load(shard_file))
                bar.update(shards[-1].shape[0])
            continue
        pending.append(document_views(record, os.path.dirname(os.path.abspath(path)), json_keys))
        if count % shard_size == 0 or count == total:
            shards.append(_embed_shard(embedder, pending, batch_size, dropout, seed, count - len(pending), bar))
            pending = []
            if shard_file:
                os.makedirs(shard_dir, exist_ok=True)
                np.save(shard_file, shards[-1])
    bar.close()
    if count != total:
        raise ValueError(f"{prefix}: the source inputs give {count} documents but the dataset has {total}; "
                         "pass the same --input files, in the same order, as preprocessing")
    return np.concatenate(shards) if shards else np.zeros((0, embedder.dim), np.float32)


def _embed_shard(embedder: ClipEmbedder, docs: List[Tuple[str, List[str]]], batch_size: int, dropout: float,
                 seed: int, first: int, bar: Any) -> np.ndarray:
    out = []
    for b in range(0, len(docs), batch_size):
        chunk = docs[b:b + batch_size]
        seeds = [seed * 1_000_003 + first + b + j for j in range(len(chunk))]
        out.append(embedder.embed(chunk, dropout=dropout, seeds=seeds))
        bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)
