"""Per-modality perplexity of a checkpoint over a Megatron indexed dataset (tools/evaluate.py, and the
trainer's validation).

The paper reports Wikipedia perplexity (text) and MS-COCO perplexity (images);
this computes both from one pass. Every document is scored on its own, so an
MS-COCO caption is never conditioned on an unrelated earlier document: the
document's sequences are joined and cut with Hugging Face's strided
perplexity recipe (windows of seq_length inputs + 1 label, starting every
`stride` tokens; each window scores only the targets no earlier window
scored, so every target but the document's first token counts exactly once,
with as much left context as the window allows). The stride defaults to
seq_length // 2 (`default_stride`); stride = seq_length is plain
non-overlapping windows. Windows of all documents are batched together,
padded with a loss mask (to seq_length under pipeline parallelism; else
sorted by length, each batch cut to its longest window). A target counts as image when its
stored sequence has the image mode (multimodal datasets,
`megatron_jam.data.indexed_builder.MODE_IMAGE`), else as text (special tokens
sit in text sequences); a plain Megatron text dataset (no modes) is all text.

Logits of padded vocabulary rows (ids >= the model's vocab_size) are masked
out before the softmax: they are never data and converted checkpoints leave
them at zero. Windows are split round-robin over data-parallel ranks; the
sums (NLL and token counts per modality) are all-reduced, so every rank
returns the same result. Any TP/PP layout works (Megatron-Core's schedules).
"""

import math
import os
from functools import partial
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_jam.data.indexed_builder import MODE_IMAGE
from megatron_jam.parallel.schedule import to_model_device
from megatron_jam.parallel.state import comm_device
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)
Source = tuple[str, "range | None"]
"""A dataset prefix and the documents of it to score (None: all)."""


def check_data(prefix: str, load: str, vocab_size: int) -> None:
    """Before the model is built: PREFIX.bin against PREFIX.idx, and the data's vocabulary layout (when it has
    one; a plain Megatron text dataset has none) against the one the checkpoint records and its vocab_size.
    Raises `DatasetFileError` (a ValueError, exit 2 in tools/evaluate.py) naming the file."""
    from megatron_jam.data.integrity import DatasetFileError, check_data_for_checkpoint

    if not os.path.exists(prefix + ".idx"):
        return  # reported by `open_dataset`, after the checkpoint's own checks (tests/test_adversarial_checkpoints.py)
    layout = check_data_for_checkpoint([prefix], load, require_layout=False)[prefix]
    if layout is not None and layout.vocab_size > vocab_size:
        raise DatasetFileError(f"{prefix}: the vocabulary layout has {layout.vocab_size} ids but the checkpoint "
                               f"{load} has vocab_size={vocab_size}")


def open_dataset(prefix: str):
    """(IndexedDataset, has_modes) for a Megatron dataset prefix, multimodal or plain (its files checked)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jam.data.integrity import check_dataset_files

    has_modes = bool(check_dataset_files(prefix)["has_modes"])
    return IndexedDataset(prefix, multimodal=has_modes), has_modes


def default_stride(seq_length: int, stride: int | None = None) -> int:
    """The stride of the strided windows: `stride`, else seq_length // 2 (Hugging Face's perplexity recipe:
    every scored target has at least half a window of left context); 1 <= stride <= seq_length, since a
    larger stride would leave targets no window scores."""
    stride = max(1, seq_length // 2) if stride is None else stride
    if not 1 <= stride <= seq_length:
        raise ValueError(f"--eval-stride {stride} must be between 1 and --seq-length {seq_length}")
    return stride


def document_spans(n: int, seq_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_target) of the windows of a document of n tokens: tokens [begin, end) are the
    window (at most seq_length + 1), targets [first_target, end) are the ones it scores."""
    begin, first = 0, 1
    while first < n:
        end = min(begin + seq_length + 1, n)
        yield begin, end, first
        begin, first = begin + stride, end


def documents(ds, has_modes: bool, docs: range | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens int64, is_image bool) of every document (its stored sequences joined) in `docs` (default all)."""
    bounds = ds.document_indices
    for d in docs if docs is not None else range(len(bounds) - 1):
        toks, imgs = [], []
        for i in range(int(bounds[d]), int(bounds[d + 1])):
            item = ds[i]  # multimodal datasets return (tokens, mode)
            tok, mode = (item[0], item[1]) if has_modes else (item, None)
            toks.append(np.asarray(tok, dtype=np.int64))
            imgs.append(np.full(len(toks[-1]), mode == MODE_IMAGE))
        if toks:
            yield np.concatenate(toks), np.concatenate(imgs)


def windows(ds, has_modes: bool, seq_length: int, limit: int | None = None, stride: int | None = None,
            docs: range | None = None) -> Iterator[tuple[np.ndarray, ...]]:
    """(tokens [s+1] int64, is_image [s+1] bool, scored [s+1] bool) strided windows of each document, padded;
    scored[j] says whether token j of the window is a target scored here (see the module docstring)."""
    span, stride, n = seq_length + 1, default_stride(seq_length, stride), 0
    for tok, img in documents(ds, has_modes, docs):
        for begin, end, first in document_spans(len(tok), seq_length, stride):
            if limit is not None and n >= limit:
                return
            pad = span - (end - begin)
            scored = np.zeros(span, bool)
            scored[first - begin: end - begin] = True
            yield np.pad(tok[begin:end], (0, pad)), np.pad(img[begin:end], (0, pad)), scored
            n += 1


def _batches(wins: list, micro_batch_size: int, multiple: int | None = None) -> list[dict]:
    """Micro-batches of windows. With `multiple` (no pipeline, so no fixed p2p shape) the windows are sorted by
    length and each batch is cut to its longest window, rounded up to `multiple` tokens (a multiple of TP for
    sequence parallelism): short documents (an MS-COCO caption + image) then cost their length, not seq_length."""
    if multiple:
        wins = sorted(wins, key=_used_length, reverse=True)
    out = []
    for j in range(0, len(wins), micro_batch_size):
        tok, img, valid = (torch.from_numpy(np.stack(x)) for x in zip(*wins[j: j + micro_batch_size]))
        s = tok.shape[1] - 1
        if multiple:
            longest = max(_used_length(w) for w in wins[j: j + micro_batch_size])  # inputs needed: longest - 1
            s = min(s, max(1, math.ceil((longest - 1) / multiple)) * multiple)
            tok, img, valid = tok[:, :s + 1], img[:, :s + 1], valid[:, :s + 1]
        out.append({"tokens": tok[:, :-1].contiguous(), "labels": tok[:, 1:].contiguous(),
                    "position_ids": torch.arange(s).expand(tok.shape[0], s).contiguous(),
                    "is_image": img[:, 1:], "valid": valid[:, 1:]})
    return out


def _used_length(window: tuple) -> int:
    """Tokens of a window up to its last scored target (0 for a padding window)."""
    scored = np.flatnonzero(window[2])
    return int(scored[-1]) + 1 if scored.size else 0


def _nll_sums(vocab_size: int, batch: dict, logits: torch.Tensor):
    """Loss function: logits [b, s, V/tp] -> report with NLL sums and counts per modality."""
    rows = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * rows
    logits = logits.float().transpose(0, 1).contiguous()  # [s, b, V/tp]
    pad_cols = torch.arange(first, first + rows, device=logits.device) >= vocab_size
    logits[..., pad_cols] = float("-inf")
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits, batch["labels"].t().contiguous()).t()  # [b, s]
    img, valid = batch["is_image"], batch["valid"]
    sums = torch.stack([(nll * (valid & ~img)).sum(), (valid & ~img).sum(), (nll * (valid & img)).sum(),
                        (valid & img).sum()]).double()
    return torch.zeros((), requires_grad=False), {"sums": sums}


def _forward_step(vocab_size: int, data_iterator, model):
    batch = to_model_device(next(data_iterator))
    logits = model(batch["tokens"], batch["position_ids"])
    return logits, partial(_nll_sums, vocab_size, batch)


def collect_windows(sources: Sequence[Source], seq_length: int, max_windows: int | None = None,
                    stride: int | None = None) -> tuple[list, bool]:
    """(windows, any source multimodal) of every source; `max_windows` is shared evenly among the sources, so
    a blend's validation split scores every prefix. Raises ValueError naming a source with no target."""
    wins, multimodal = [], False
    cap = None if max_windows is None else math.ceil(max_windows / len(sources))
    for prefix, docs in sources:
        ds, has_modes = open_dataset(prefix)
        mine = list(windows(ds, has_modes, seq_length, cap, stride, docs))
        if not mine:
            raise ValueError(f"{prefix}: no document of 2 tokens or more, nothing to evaluate")
        wins += mine
        multimodal = multimodal or has_modes
    return wins, multimodal


def _check_ids(wins: list, vocab_size: int, name: str) -> None:
    for tok, _, _ in wins:
        if tok.max() >= vocab_size:
            raise ValueError(f"{name}: token id {int(tok.max())} >= the model's vocab_size {vocab_size}")


@torch.no_grad()
def perplexity(chunks: list, vocab_size: int, prefix: str | Sequence[Source], seq_length: int,
               micro_batch_size: int = 1, max_windows: int | None = None, stride: int | None = None) -> dict:
    """NLL and perplexity over all, text and image targets of the dataset at `prefix` (or of several
    `Source`s, pooled), per document (see the module docstring). Leaves the chunks in eval mode."""
    sources = [(prefix, None)] if isinstance(prefix, str) else list(prefix)
    all_wins, has_modes = collect_windows(sources, seq_length, max_windows, stride)
    _check_ids(all_wins, vocab_size, sources[0][0])
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = all_wins[dp_rank::dp]
    per_rank = math.ceil(len(all_wins) / dp)
    if len(chunks) > 1:  # interleaved pipeline: Megatron-Core's schedule runs whole groups of PP micro-batches
        group = micro_batch_size * parallel_state.get_pipeline_model_parallel_world_size()
        per_rank = math.ceil(per_rank / group) * group
    pad = (all_wins[0][0], all_wins[0][1], np.zeros_like(all_wins[0][2]))  # equal microbatch counts on all DP ranks
    mine += [pad] * (per_rank - len(mine))
    for c in chunks:
        c.eval()
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    batches = _batches(mine, micro_batch_size, multiple=16 * tp if pp == 1 else None)
    sums = _forward_sums(chunks, batches, vocab_size, seq_length, micro_batch_size)
    dist.all_reduce(sums)  # on the GPU under NCCL
    return _summary(sums.tolist(), len(all_wins), has_modes, default_stride(seq_length, stride))


def _forward_sums(chunks: list, batches: list, vocab_size: int, seq_length: int, micro_batch_size: int):
    """This rank's [nll text, n text, nll image, n image] (zeros off the last stage's first TP rank)."""
    from megatron_jam.parallel.schedule import forward_backward

    sums = torch.zeros(4, dtype=torch.float64, device=comm_device())
    if not batches:
        return sums
    reports = forward_backward(chunks, iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
                               num_microbatches=len(batches), seq_length=seq_length,
                               micro_batch_size=micro_batch_size, forward_only=True,
                               forward_step_func=partial(_forward_step, vocab_size))
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) \
            and parallel_state.get_tensor_model_parallel_rank() == 0:
        sums = sum((r["sums"] for r in reports), sums)
    return sums


def _summary(sums: list[float], n_windows: int, has_modes: bool, stride: int) -> dict:
    nll_text, n_text, nll_img, n_img = sums
    out = {"windows": n_windows, "stride": stride, "multimodal": has_modes, "tokens": {}, "nll": {}, "ppl": {}}
    for name, nll, n in (("all", nll_text + nll_img, n_text + n_img), ("text", nll_text, n_text),
                         ("image", nll_img, n_img)):
        out["tokens"][name] = int(n)
        out["nll"][name] = nll / n if n else None
        out["ppl"][name] = math.exp(nll / n) if n else None
    log_rank0(logger, "perplexity: all=%s text=%s image=%s", *(out["ppl"][k] for k in ("all", "text", "image")))
    return out


class DocumentValidation:
    """A trainer validation set scored as tools/evaluate.py scores it (per document, no CM3, no retrieval,
    every token weighted 1), so the validation curve and a later `tools/evaluate.py` agree; the same windows
    at every evaluation, so the curve compares like with like. `--cm3-validation` keeps the training
    objective's packed CM3 samples instead (`training/data.py`)."""

    def __init__(self, name: str, sources: Sequence[Source], vocab_size: int, seq_length: int,
                 max_windows: int | None, stride: int | None) -> None:
        self.name, self.sources, self.vocab_size = name, list(sources), vocab_size
        self.seq_length, self.max_windows, self.stride = seq_length, max_windows, stride

    def evaluate(self, chunks: list, micro_batch_size: int) -> dict:
        """{lm_loss, text_loss, image_loss}: mean NLL of all, text, image targets (NaN without any)."""
        out = perplexity(chunks, self.vocab_size, self.sources, self.seq_length, micro_batch_size,
                         self.max_windows, self.stride)["nll"]
        return {f"{k}_loss" if k != "all" else "lm_loss": float("nan") if v is None else v for k, v in out.items()}
