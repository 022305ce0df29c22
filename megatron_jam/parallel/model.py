"""Build a model's chunks for this rank and wrap them for Megatron-Core training.

Why: pipeline parallelism gives each rank one chunk per virtual stage, each
with its own pre/post-process role; Megatron-Core's schedules and
`finalize_model_grads` expect a list of `DistributedDataParallel`-wrapped
chunks whose config carries the finalize hook. This module does that once,
for any model class whose constructor takes (cfg, pre_process, post_process,
vp_stage=..., **parallel).
"""

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel.utils import is_vp_first_stage, is_vp_last_stage


def parallel_kwargs(tp: int = 1, pp: int = 1, vpp: int | None = None, sequence_parallel: bool = False,
                    bf16: bool = False, **extra) -> dict:
    """The `ModelParallelConfig` fields of a run (Megatron-LM's flag names, as keyword arguments).

    On gloo, pipeline p2p goes through Megatron's ordered isend/irecv path instead of
    `batch_isend_irecv`: with PP=2 and virtual stages a rank sends an activation and a
    gradient to the same peer in one batch, and gloo matches same-peer messages by
    order, which the batched path does not keep (activations and gradients of equal
    shape get swapped; the interleaved equivalence test catches it).
    """
    kw = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
              virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel,
              bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    if dist.is_initialized() and dist.get_backend() == "gloo":
        kw["batch_p2p_comm"] = False
    return kw | extra


def build_model_chunks(model_cls: Callable, cfg, parallel: dict, wrap_ddp: bool = True,
                       ddp_config: DistributedDataParallelConfig | None = None, **model_kwargs) -> list:
    """One chunk per virtual pipeline stage held by this rank, DDP-wrapped if asked."""
    vpp = parallel.get("virtual_pipeline_model_parallel_size")
    chunks = []
    for vp_stage in range(vpp or 1):
        vp = vp_stage if vpp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=True) and is_vp_first_stage(vp, vpp)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and is_vp_last_stage(vp, vpp)
        chunks.append(model_cls(cfg, pre_process=first, post_process=last, vp_stage=vp,
                                **model_kwargs, **parallel))
    if torch.cuda.is_available():  # Megatron-LM's get_model: the whole chunk on this rank's GPU
        for c in chunks:
            c.cuda(torch.cuda.current_device())
    if parallel.get("bf16"):  # Megatron-LM's mixed precision: bf16 model, fp32 outputs at the last stage
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(c.config, c) for c in chunks]
    if not wrap_ddp:
        return chunks
    ddp_config = ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    wrapped = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    one = len(wrapped) == 1  # Megatron-LM's setup: a function for one chunk, a list per virtual stage
    config.no_sync_func = wrapped[0].no_sync if one else [m.no_sync for m in wrapped]
    if ddp_config.overlap_grad_reduce:  # the schedule starts each chunk's reduction when its last backward ends
        config.grad_sync_func = wrapped[0].start_grad_sync if one else [m.start_grad_sync for m in wrapped]
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = wrapped[0].start_param_sync if one else [m.start_param_sync for m in wrapped]
    return wrapped


def unwrap(chunk) -> torch.nn.Module:
    """The model inside a DDP (or Float16) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
