"""GPU suite: the trainer, checkpoints and generation on one CUDA device (NCCL, bf16, distributed optimizer).

Runs only with `MEGATRON_JAM_TEST_GPU=1` on a CUDA machine (conftest.py hides GPUs from the
default CPU suite); docs/gpu.md has the command and the figures these checks were set from.
Tensor and pipeline parallelism over NCCL need two GPUs and are not covered here.
"""

import json
import math
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "jam_cross_tiny.json")
BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "64", "--lr", "3e-3",
        "--lr-warmup-iters", "2", "--lr-decay-iters", "12", "--log-interval", "1", "--mock-data-samples", "4"]


def _layout():
    from megatron_jam.data.vocab import VocabLayout

    return VocabLayout(text_vocab_size=40, codebook_size=16, tokens_per_image=4, num_sentinels=2)


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """The tiny JAM-Cross (Llama + OPT streams, k=2) with the vocabulary of a small layout."""
    cfg = json.load(open(TINY)) | {"vocab_size": _layout().vocab_size}
    path = tmp_path_factory.mktemp("cfg") / "model_config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_cpu_layer_is_a_no_op(single_rank):
    import torch.distributed as dist
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_jam import platform

    assert not platform.cpu_mode_active()
    assert not getattr(torch.zeros, "__jam_cpu_patch__", False)
    assert torch.zeros(1, device="cuda").is_cuda
    assert mrandom.CudaRNGStatesTracker.__name__ == "CudaRNGStatesTracker"
    assert dist.get_backend() == "nccl"


def _losses(history):
    return [r["lm_loss"] for r in history]


@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer"]], ids=["bf16", "bf16+distopt"])
def test_bf16_training_learns_and_resumes(single_rank, model_config, tmp_path, extra):
    from megatron_jam.training.loop import main

    args = BASE + ["--model-config", model_config, "--bf16"] + extra
    full = main(args + ["--train-iters", "12", "--save", str(tmp_path / "full"), "--save-interval", "6"])
    losses = _losses(full)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 1.0, losses  # one fixed batch: the loss must fall
    assert all(r["skipped_iterations"] == 0 for r in full)
    main(args + ["--train-iters", "6", "--save", str(tmp_path / "part")])
    resumed = main(args + ["--train-iters", "12", "--save", str(tmp_path / "part")])
    assert [r["iteration"] for r in resumed] == list(range(7, 13))
    # Same kernels, same order, restored CUDA RNG: the resumed steps match the uninterrupted run.
    # (bf16: passed on an H200. bf16+distopt: failed there from step 8 on, Adam's step was reset;
    # fixed in checkpointing.py afterwards but not re-run on a GPU, see docs/gpu.md.)
    torch.testing.assert_close(_losses(resumed), losses[6:], rtol=1e-5, atol=0)


def test_bf16_weights_only_load_keeps_the_weights(single_rank, model_config, tmp_path):
    """A weights-only load (--finetune, converted checkpoints) in bf16 must refresh the optimizer's
    fp32 main parameters; before the fix the first step wrote the random initial weights back
    (seen on an H200: the loss jumped to ln(V) after one step). Not yet run on a GPU: no device time
    was left after the fix (docs/gpu.md)."""
    from megatron_jam.training.loop import main

    args = BASE + ["--model-config", model_config, "--bf16"]
    main(args + ["--train-iters", "8", "--save", str(tmp_path / "trained")])
    tuned = main(args + ["--train-iters", "3", "--lr", "1e-7", "--min-lr", "1e-7", "--lr-decay-iters", "3",
                         "--load", str(tmp_path / "trained"), "--finetune"])
    losses = _losses(tuned)
    assert max(losses) - min(losses) < 0.02, losses  # a negligible learning rate: the loss stays put


def test_generation_from_a_bf16_checkpoint(single_rank, model_config, tmp_path):
    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.loading import load_model
    from megatron_jam.inference.sampling import SamplingParams
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.training.loop import main

    main(BASE + ["--model-config", model_config, "--bf16", "--train-iters", "4", "--save", str(tmp_path)])
    initialize_model_parallel(1, 1, seed=1234)
    model, cfg = load_model(str(tmp_path), tp=1)
    assert next(model.parameters()).is_cuda
    lay = _layout()
    prompts = [[1, 2, 3, 4, 5], [6, 7, lay.break_id]]  # text, and a prompt that starts an image
    outs = {}
    for use_cache in (True, False):
        gen = InterleavedGenerator(model, cfg, lay, use_cache=use_cache)
        outs[use_cache] = gen.generate(prompts, SamplingParams(seed=3, cfg_scale=3.0), max_new_tokens=12)
    for o in outs[True]:
        assert o.finish_reason in ("eos", "length") and 1 <= len(o.ids) <= 12
        lay.check_ids(o.ids, "generated")
    assert len([t for t in outs[True][1].ids[:lay.tokens_per_image]
                if lay.image_offset <= t < lay.vocab_size]) == lay.tokens_per_image
    # The KV cache must not change what is generated (fp32 model: ids agree exactly here).
    assert [o.ids for o in outs[True]] == [o.ids for o in outs[False]]
    # Nor must the CUDA graph of the decode step (captured once per generate call, replayed every step;
    # never run on a GPU when written, see docs/gpu.md), twice to reuse nothing from the first call.
    for _ in range(2):
        gen = InterleavedGenerator(model, cfg, lay, decode_step="cuda-graph")
        graphed = gen.generate(prompts, SamplingParams(seed=3, cfg_scale=3.0), max_new_tokens=12)
        assert [o.ids for o in graphed] == [o.ids for o in outs[True]]
        assert gen._static is not None and gen._static._graph is not None  # the graph was captured and replayed
