"""Shared fixtures: one gloo worker pool per world size for the whole session (start-up paid once).

Two suites share this folder. By default the CPU suite runs (what CI runs): GPUs are hidden from
this process and its workers before torch initialises CUDA, so a GPU machine takes the same code
path (the CPU layer, gloo) as CI, and the `gpu` tests skip. `MEGATRON_JAM_TEST_GPU=1` runs the
GPU suite instead: only tests marked `gpu` (tests/test_gpu.py, tests/test_gpu_specs.py), with
CUDA visible; see docs/gpu.md.
"""

import os
import warnings

import pytest

GPU_SUITE = os.environ.get("MEGATRON_JAM_TEST_GPU") == "1"
if not GPU_SUITE:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
os.environ.setdefault("MEGATRON_JAM_LOG_LEVEL", "WARNING")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")


def pytest_collection_modifyitems(config, items):
    """The GPU suite runs only `gpu` tests; the CPU suite skips them."""
    for item in items:
        is_gpu = item.get_closest_marker("gpu") is not None
        if GPU_SUITE and not is_gpu:
            item.add_marker(pytest.mark.skip(reason="CPU-suite test (run without MEGATRON_JAM_TEST_GPU=1)"))
        elif not GPU_SUITE and is_gpu:
            item.add_marker(pytest.mark.skip(reason="GPU suite: MEGATRON_JAM_TEST_GPU=1 on a CUDA machine"))


@pytest.fixture(scope="session")
def pool2():
    from megatron_jam.testing.distributed import WorkerPool

    pool = WorkerPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def single_rank():
    """This process as a one-rank world (gloo; NCCL in the GPU suite, as the trainer picks) with
    Megatron parallel state at TP=1, PP=1."""
    import torch
    import torch.distributed as dist

    import megatron_jam  # noqa: F401
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.testing.distributed import _free_port

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    initialize_model_parallel(1, 1, seed=1234)
    yield
