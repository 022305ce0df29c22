"""One training/eval step through Megatron-Core's own pipeline schedules.

`forward_backward` picks the schedule with `get_forward_backward_func()`
(no pipelining, 1F1B, or interleaved 1F1B with virtual stages) and tells it
the p2p tensor shape. A two-stream model (JAM-Cross) sends both streams packed
on the batch dimension, so the shape the schedule allocates is
`[s(/tp if SP), p2p_batch_multiplier * b, h]`.
"""

from functools import partial
from typing import Iterator

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_jam.parallel.model import unwrap


def masked_mean_loss(loss_mask: torch.Tensor, modality: torch.Tensor | None, per_token_loss: torch.Tensor):
    """Mean of the per-token loss over tokens with loss_mask > 0 (weights allowed).

    Megatron's (loss, report) convention; the report also carries the summed loss
    and token count of text (modality 0) and image (modality 1) targets.
    """
    mask = loss_mask.float().reshape(-1)
    tok = per_token_loss.float().reshape(-1)
    loss = (tok * mask).sum() / mask.sum().clamp(min=1)
    report = {"lm loss": loss.detach().clone()}
    if modality is not None:
        is_image = modality.reshape(-1) == 1
        counted = mask > 0
        for name, sel in (("text", counted & ~is_image), ("image", counted & is_image)):
            report[f"{name} loss sum"] = (tok.detach() * mask)[sel].sum()  # weighted like the lm loss
            report[f"{name} tokens"] = mask[sel].sum()
    return loss, report


def to_model_device(batch: dict) -> dict:
    """The batch's tensors on this rank's GPU (Megatron-LM's `get_batch`); unchanged on CPU.

    Data sources build micro-batches on the CPU; the model lives on
    `torch.cuda.current_device()` whenever CUDA is available (`build_model_chunks`).
    """
    if not torch.cuda.is_available():
        return batch
    dev = torch.cuda.current_device()
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def lm_forward_step(data_iterator: Iterator, model):
    """Megatron forward_step_func: batch dict -> (per-token loss, loss function)."""
    batch = to_model_device(next(data_iterator))
    out = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return out, partial(masked_mean_loss, batch["loss_mask"], batch.get("modality"))


def forward_backward(model_chunks: list, data_iterators, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False, forward_step_func=lm_forward_step):
    """Run one step over `num_microbatches`; returns the per-microbatch loss reports (last stage)."""
    if not isinstance(data_iterators, list):
        if len(model_chunks) > 1:
            raise ValueError("virtual pipeline stages need one data iterator per model chunk "
                             "(a shared iterator would hand each chunk different micro-batches)")
        data_iterators = [data_iterators]
    multiplier = getattr(unwrap(model_chunks[0]), "p2p_batch_multiplier", 1)
    for chunk in model_chunks:
        if hasattr(chunk, "zero_grad_buffer") and not forward_only:
            chunk.zero_grad_buffer()
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(model_chunks) > 1 else data_iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size * multiplier,  # p2p shape: [s, multiplier*b, h]
        forward_only=forward_only,
    )
