"""JAM-Cross, JAM-Width and JAM-Uniform checkpoints from the converter train through the same
entry point (`--load` of a converted checkpoint), at TP=2, and lower the loss on a fixed batch."""

import math

import pytest

from parent_helpers import convert, make_llama


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    make_llama(root / "llm", seed=1)
    make_llama(root / "img", seed=2)
    out = {}
    for method, kw in {"uniform": {}, "width": {"width_init": "copy"}, "cross": {"cross_every": 1}}.items():
        convert(method, root / method, root / "llm", root / "img", **kw)
        out[method] = str(root / method)
    return out


def _train(argv):
    from megatron_jam.training.loop import main

    return [r["lm_loss"] for r in main(argv)]


@pytest.mark.parametrize("method", ["uniform", "width", "cross"])
def test_converted_model_trains_on_a_fixed_batch(pool2, converted, method):
    argv = ["--load", converted[method], "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--mock-data-samples", "4", "--train-iters", "6", "--lr", "1e-2", "--lr-warmup-iters", "0",
            "--lr-decay-style", "constant", "--tensor-model-parallel-size", "2", "--sequence-parallel"]
    curve = next(c for c in pool2.run(_train, argv) if not math.isnan(c[0]))
    assert curve[-1] < 0.8 * curve[0], curve
