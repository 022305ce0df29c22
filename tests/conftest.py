"""Shared fixtures: one gloo worker pool per world size for the whole session (start-up paid once)."""

import os
import warnings

import pytest

os.environ.setdefault("MEGATRON_JAM_LOG_LEVEL", "WARNING")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")


@pytest.fixture(scope="session")
def pool2():
    from megatron_jam.testing.distributed import WorkerPool

    pool = WorkerPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def single_rank():
    """This process as a one-rank gloo world with Megatron parallel state at TP=1, PP=1."""
    import torch.distributed as dist

    import megatron_jam  # noqa: F401
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.testing.distributed import _free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    initialize_model_parallel(1, 1, seed=1234)
    yield
