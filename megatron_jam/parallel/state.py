"""Full (unsharded) state dicts from any TP/PP layout, using the model's own checkpoint metadata.

Why: equivalence tests and small-model tools need "the same tensor at TP=1"
for a weight or gradient that lives sharded across ranks. Megatron-Core
already knows where every shard sits: `sharded_state_dict()` gives each local
tensor's key, global shape and offset (including the layer axis that pipeline
stages split). `gather_full_state_dict` assembles those shards on every rank;
`load_full_state_dict` copies slices of full tensors into the local shards.
Keys are the checkpoint keys, so both work across layouts. For tiny models
only: everything is gathered into every rank's memory.
"""

import contextlib

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

from megatron_jam.parallel.model import unwrap


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, else the CPU (gloo). Here, below
    training/, inference/ and evaluation, which all reduce or broadcast."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_shards(model_chunks: list, main_only: bool) -> list[ShardedTensor]:
    shards = []
    for chunk in model_chunks:
        sd = unwrap(chunk).sharded_state_dict()
        apply_factories(sd)
        for sh in nested_values(sd):
            if isinstance(sh, ShardedTensor) and (not main_only or is_main_replica(sh.replica_id)):
                shards.append(sh)
    return shards


def _index(sh: ShardedTensor) -> tuple:
    """Slices of the global tensor covered by this shard (prepended axes are single indices)."""
    n_pre = sh.prepend_axis_num
    idx = [sh.global_offset[i] for i in range(n_pre)]
    idx += [slice(o, o + s) for o, s in zip(sh.global_offset[n_pre:], sh.data.shape)]
    return tuple(idx)


def gather_full_state_dict(model_chunks: list) -> dict[str, torch.Tensor]:
    """Every checkpoint key's full tensor (fp32, CPU), identical on all ranks."""
    local = [(sh.key, tuple(sh.global_shape), _index(sh), sh.data.detach().float().cpu())
             for sh in _local_shards(model_chunks, main_only=True)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for rank_shards in everyone:
        for key, shape, idx, data in rank_shards:
            t = full.setdefault(key, torch.zeros(shape))
            t[idx] = data
            filled[key] = filled.get(key, 0) + data.numel()
    for key, t in full.items():
        if filled[key] != t.numel():
            raise RuntimeError(f"shards of {key} cover {filled[key]} of {t.numel()} elements")
    return full


@torch.no_grad()
def load_full_state_dict(model_chunks: list, full: dict[str, torch.Tensor]) -> None:
    """Copy the matching slice of each full tensor into this rank's shards (all replicas)."""
    for sh in _local_shards(model_chunks, main_only=False):
        if sh.key not in full:
            raise KeyError(f"checkpoint key {sh.key} missing from the full state dict")
        src = full[sh.key]
        if tuple(src.shape) != tuple(sh.global_shape):
            raise ValueError(f"{sh.key}: full tensor shape {tuple(src.shape)} != model's global shape "
                             f"{tuple(sh.global_shape)}")
        sh.data.copy_(src[_index(sh)])


@contextlib.contextmanager
def params_as_grads(model_chunks: list):
    """Temporarily make every parameter's `.data` its gradient (DDP `main_grad`, else `.grad`),
    so `gather_full_state_dict` gathers gradients under the same keys as weights."""
    saved = []
    for chunk in model_chunks:
        for p in unwrap(chunk).parameters():
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            saved.append((p, p.data))
            p.data = (torch.zeros_like(p.data) if g is None else g.detach().view_as(p.data)).to(p.dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
