"""Per-modality perplexity of a checkpoint over a Megatron indexed dataset (tools/evaluate.py).

The paper reports Wikipedia perplexity (text) and MS-COCO perplexity (images);
this computes both from one pass: the dataset's sequences, in order, form one
token stream, cut into windows of seq_length + 1 tokens that overlap by one
(every token but the first is a target exactly once). A target counts as
image when its stored sequence has the image mode (multimodal datasets,
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
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_jam.data.indexed_builder import MODE_IMAGE
from megatron_jam.parallel.schedule import to_model_device
from megatron_jam.parallel.state import comm_device
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


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


def windows(ds, has_modes: bool, seq_length: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, ...]]:
    """(tokens [s+1] int64, is_image [s+1] bool, valid [s+1] bool) windows over the whole stream."""
    span = seq_length + 1
    buf_tok, buf_img = np.zeros(0, np.int64), np.zeros(0, bool)
    n = 0
    for i in range(len(ds)):
        item = ds[i]  # multimodal datasets return (tokens, mode)
        tok, mode = (item[0], item[1]) if has_modes else (item, None)
        tok = np.asarray(tok, dtype=np.int64)
        img = np.full(tok.shape, mode == MODE_IMAGE)
        buf_tok, buf_img = np.concatenate([buf_tok, tok]), np.concatenate([buf_img, img])
        while len(buf_tok) >= span:
            yield buf_tok[:span], buf_img[:span], np.ones(span, bool)
            buf_tok, buf_img = buf_tok[seq_length:], buf_img[seq_length:]
            n += 1
            if limit is not None and n >= limit:
                return
    if len(buf_tok) > 1:
        pad = span - len(buf_tok)
        valid = np.concatenate([np.ones(len(buf_tok), bool), np.zeros(pad, bool)])
        yield np.pad(buf_tok, (0, pad)), np.pad(buf_img, (0, pad)), valid


def _batches(wins: list, micro_batch_size: int) -> list[dict]:
    out = []
    for j in range(0, len(wins), micro_batch_size):
        tok, img, valid = (torch.from_numpy(np.stack(x)) for x in zip(*wins[j: j + micro_batch_size]))
        s = tok.shape[1] - 1
        out.append({"tokens": tok[:, :-1].contiguous(), "labels": tok[:, 1:].contiguous(),
                    "position_ids": torch.arange(s).expand(tok.shape[0], s).contiguous(),
                    "is_image": img[:, 1:], "valid": valid[:, 1:]})
    return out


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


@torch.no_grad()
def perplexity(chunks: list, vocab_size: int, prefix: str, seq_length: int, micro_batch_size: int = 1,
               max_windows: int | None = None) -> dict:
    """NLL and perplexity over all, text and image targets of the dataset at `prefix`."""
    from megatron_jam.parallel.schedule import forward_backward

    ds, has_modes = open_dataset(prefix)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    all_wins = list(windows(ds, has_modes, seq_length, max_windows))
    if not all_wins:
        raise ValueError(f"{prefix}: fewer than 2 tokens, nothing to evaluate")
    for tok, _, valid in all_wins:
        if tok[valid].size and tok[valid].max() >= vocab_size:
            raise ValueError(f"{prefix}: token id {int(tok[valid].max())} >= the model's vocab_size {vocab_size}")
    mine = all_wins[dp_rank::dp]
    per_rank = math.ceil(len(all_wins) / dp)
    pad = (all_wins[0][0], all_wins[0][1], np.zeros_like(all_wins[0][2]))  # equal microbatch counts on all DP ranks
    mine += [pad] * (per_rank - len(mine))
    batches = _batches(mine, micro_batch_size)
    for c in chunks:
        c.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=comm_device())
    if batches:
        reports = forward_backward(chunks, iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
                                   num_microbatches=len(batches), seq_length=seq_length,
                                   micro_batch_size=micro_batch_size, forward_only=True,
                                   forward_step_func=partial(_forward_step, vocab_size))
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) \
                and parallel_state.get_tensor_model_parallel_rank() == 0:
            sums = sum((r["sums"] for r in reports), sums)
    dist.all_reduce(sums)  # on the GPU under NCCL
    return _summary(sums.tolist(), len(all_wins), has_modes)


def _summary(sums: list[float], n_windows: int, has_modes: bool) -> dict:
    nll_text, n_text, nll_img, n_img = sums
    out = {"windows": n_windows, "multimodal": has_modes, "tokens": {}, "nll": {}, "ppl": {}}
    for name, nll, n in (("all", nll_text + nll_img, n_text + n_img), ("text", nll_text, n_text),
                         ("image", nll_img, n_img)):
        out["tokens"][name] = int(n)
        out["nll"][name] = nll / n if n else None
        out["ppl"][name] = math.exp(nll / n) if n else None
    log_rank0(logger, "perplexity: all=%s text=%s image=%s", *(out["ppl"][k] for k in ("all", "text", "image")))
    return out
