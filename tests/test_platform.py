"""The CPU layer for Megatron-Core (megatron_jam/platform.py) and the gloo worker pool.

These fail loudly when a Megatron-Core upgrade moves or renames what the CPU
layer patches; the equivalence tests then check the behaviour end to end.
"""

import os

import pytest
import torch

from megatron_jam import platform

CPU_ONLY = not torch.cuda.is_available()


def test_megatron_core_version_is_the_checked_one():
    assert platform.check_megatron_core_version() == platform.MEGATRON_CORE_VERSION == "0.16.1"


def test_patched_megatron_entry_points_exist():
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker",
                 "initialize_rng_tracker", "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed"):
        assert hasattr(mrandom, name), f"megatron.core.tensor_parallel.random.{name} is gone"
    assert callable(get_forward_backward_func)
    if CPU_ONLY:
        assert platform.cpu_mode_active()
        assert mrandom.CudaRNGStatesTracker.__name__ == "CpuRNGStatesTracker"
        assert type(mrandom.get_cuda_rng_tracker()).__name__ == "CpuRNGStatesTracker"
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        assert DistributedOptimizer._build_model_and_main_param_groups.__func__.__jam_cpu_patch__


@pytest.mark.skipif(not CPU_ONLY, reason="the CPU layer is a no-op when CUDA is available")
def test_cpu_tensors_are_typed_as_cuda_only_inside_the_distributed_optimizer_set_up():
    p = torch.nn.Parameter(torch.zeros(2))
    with platform._cpu_tensors_typed_as_cuda():
        assert p.type() == "torch.cuda.FloatTensor" and torch.zeros(1, dtype=torch.bfloat16).type() == \
            "torch.cuda.BFloat16Tensor"
        assert p.type(torch.float64).dtype == torch.float64  # conversions untouched
    assert p.type() == "torch.FloatTensor"


@pytest.mark.skipif(not CPU_ONLY, reason="the CPU layer is a no-op when CUDA is available")
def test_cuda_device_arguments_become_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu" and t.to(0).device.type == "cpu"
    assert t.to(torch.float64).dtype == torch.float64  # dtype conversions untouched
    assert t.new_zeros(2, device="cuda").device.type == "cpu"
    torch.cuda.synchronize()


def test_rng_tracker_forks_and_restores(single_rank):
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(7)
    outside = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside), "fork must restore the default state"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the model-parallel stream advances between forks"
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with tracker.fork():
        c = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    with tracker.fork():
        d = torch.rand(4)
    assert torch.equal(c, d), "same seed, same model-parallel stream"


# ---------------------------------------------------------------- worker pool


def _rank_and_world():
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size(), os.getpid()


def _fail_on_rank1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    return "fine"


def _rank1_fails_rank0_waits():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 gave up before the barrier")
    dist.barrier()


def test_pool_runs_on_every_rank_in_order(pool2):
    out = pool2.run(_rank_and_world)
    assert [(r, w) for r, w, _ in out] == [(0, 2), (1, 2)]
    assert out[0][2] != out[1][2] != os.getpid()


def test_pool_reports_the_failing_rank_traceback(pool2):
    from megatron_jam.testing.distributed import DistributedTestError

    with pytest.raises(DistributedTestError) as err:
        pool2.run(_fail_on_rank1)
    msg = str(err.value)
    assert "failed on ranks [1]" in msg and "ValueError: boom from rank 1" in msg and "----- rank 1 -----" in msg
    assert pool2.run(_rank_and_world)[1][0] == 1  # the pool still works


def _start_checkpoint_writer_manager() -> int:
    """What a checkpoint save leaves in a rank: Megatron-Core's writer `Manager` server (a child process)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue

    _get_write_results_queue()
    return os.getpid()


def test_pool_reports_a_stuck_rank_and_restarts(pool2):
    """A stuck rank is killed with everything it started (a killed rank cannot shut its children down; a
    leaked writer `Manager` outlived the test run before `_kill_tree`)."""
    import psutil

    from megatron_jam.testing.distributed import DistributedTestError

    ranks = pool2.run(_start_checkpoint_writer_manager)
    family = [c.pid for r in ranks for c in psutil.Process(r).children(recursive=True)] + ranks
    assert len(family) >= 4
    pool2.error_grace_s = 2.0
    with pytest.raises(DistributedTestError) as err:
        pool2.run(_rank1_fails_rank0_waits)
    msg = str(err.value)
    assert "ranks [0] did not answer" in msg and "rank 1 gave up before the barrier" in msg
    left = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of the killed ranks still running: {left}"
    assert [r for r, _, _ in pool2.run(_rank_and_world)] == [0, 1]  # restarted


# ----------------------------------------------------- dist_checkpointing on gloo


def _save_tp2_load_tp1_pp2(ckpt_dir: str):
    from megatron.core import dist_checkpointing

    from megatron_jam.models.config import JamCrossConfig, ParentConfig
    from megatron_jam.models.jam_cross import JamCrossModel
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs, unwrap
    from megatron_jam.parallel.state import gather_full_state_dict

    p = ParentConfig(family="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2)
    cfg = JamCrossConfig(llm=p, img=p, vocab_size=100, cross_every=1, cross_zero_init=False)
    initialize_model_parallel(tp=2, seed=1)
    chunks = build_model_chunks(JamCrossModel, cfg, parallel_kwargs(tp=2), wrap_ddp=False)
    saved = gather_full_state_dict(chunks)
    dist_checkpointing.save(unwrap(chunks[0]).sharded_state_dict(), ckpt_dir)
    initialize_model_parallel(pp=2, seed=2)
    chunks = build_model_chunks(JamCrossModel, cfg, parallel_kwargs(pp=2), wrap_ddp=False)
    before = gather_full_state_dict(chunks)
    model = unwrap(chunks[0])
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    loaded = gather_full_state_dict(chunks)
    return (all(torch.equal(saved[k], loaded[k]) for k in saved) and set(saved) == set(loaded),
            any(not torch.equal(saved[k], before[k]) for k in saved))


def test_dist_checkpointing_saves_at_tp2_and_loads_at_pp2(pool2, tmp_path):
    (tmp_path / "ckpt").mkdir()
    out = pool2.run(_save_tp2_load_tp1_pp2, str(tmp_path / "ckpt"))
    for equal_after_load, differed_before in out:
        assert differed_before, "the second model must start from other weights"
        assert equal_after_load


def test_default_device_context_still_applies_to_wrapped_factories():
    """`with torch.device("meta")` (transformers' from_pretrained) must reach the factories."""
    with torch.device("meta"):
        for t in (torch.tensor([1.0]), torch.empty(2), torch.zeros(2), torch.arange(3)):
            assert t.device.type == "meta"


def test_transformers_from_pretrained_is_unaffected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(model.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
