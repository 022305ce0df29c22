"""Process groups and seeds, Megatron style, after validating the layout.

`initialize_distributed` reads torchrun / Slurm environment variables and
picks NCCL on GPUs and gloo on CPU; `initialize_model_parallel` builds
Megatron-Core's groups and seeds the RNG tracker (model-parallel seed offset
per TP rank), exactly as Megatron-LM does.
"""

import os
import socket

import torch

from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


def _slurm_env() -> None:
    """Map srun's variables to torchrun's when launched without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("srun launch: set MASTER_ADDR (the first node of $SLURM_JOB_NODELIST)")


def free_port() -> int:
    """A TCP port of this host that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def initialize_distributed() -> None:
    """Initialise torch.distributed from torchrun/Slurm variables (single process if none).

    A single process started without a launcher rendezvouses on a free port of its own, not on
    torchrun's default 29500: two tools run at once on one machine would otherwise collide (EADDRINUSE)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    _slurm_env()
    if not _under_launcher() and "MASTER_PORT" not in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        log_rank0(logger, "torch.distributed: backend=%s, one process (no launcher)", backend)
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log_rank0(logger, "torch.distributed: backend=%s world_size=%d", backend, dist.get_world_size())


def destroy_model_parallel() -> None:
    """Megatron's `destroy_model_parallel` plus the process groups it only forgets.

    Megatron destroys its `*_GLOO` groups but drops the others (on CPU: gloo groups with
    sockets and threads). A process that re-initialises model parallelism many times
    (tests, benchmarks) would accumulate them and slow every collective down.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        world = dist.GroupMember.WORLD
        for group in list(dist.distributed_c10d._world.pg_map):
            if group is not world:
                dist.destroy_process_group(group)


def initialize_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234) -> None:
    """Megatron-Core parallel groups (destroying earlier ones) and seeded RNG tracker.

    As Megatron-LM, each pipeline stage seeds with `seed + 100 * pp_rank`, so layers initialised
    from scratch on different stages do not repeat each other's weights.
    """
    from megatron.core import parallel_state, tensor_parallel

    destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
