"""Activation recomputation of JAM-Cross (`--recompute-granularity full|selective`, `--recompute-method
uniform|block`, `--recompute-num-layers`): the loss and every gradient equal those without recomputation, at
TP=1, TP=2 with sequence parallelism and PP=2, from the same weights; the trainer takes Megatron-LM's flags.
Recomputed steps cover both streams and the cross blocks (`models/jam_cross_loop.py`)."""

import math

import pytest

from megatron_jam.models.config import JamCrossConfig, ParentConfig

CFG = JamCrossConfig(
    llm=ParentConfig(family="llama", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     add_bias_linear=False, max_position_embeddings=64, hidden_dropout=0.1, attention_dropout=0.1),
    img=ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                     hidden_dropout=0.1),
    vocab_size=96, cross_every=2, seq_length=16, cross_zero_init=False)
"""Dropout on: the recomputed forward must replay the same dropout masks (Megatron's RNG tracker)."""
VARIANTS = {
    "full uniform 1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full uniform 2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full block 1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}


def _compare(layout: dict) -> dict:
    from megatron_jam.testing.equivalence import make_batches, relative_errors, run_layout

    batches = make_batches(CFG.vocab_size, 2, 2, CFG.seq_length, seed=4)
    ref_loss, weights, ref_grads, _ = run_layout(CFG, batches, **layout)
    out = {}
    for name, fields in VARIANTS.items():
        loss, _, grads, _ = run_layout(CFG, batches, weights=weights, **layout, **fields)
        errs = relative_errors(ref_grads, grads)
        out[name] = (abs(loss - ref_loss) / ref_loss, max(errs.values()), sum("_cross." in k for k in errs))
    return out


@pytest.mark.parametrize("layout", [{}, {"tp": 2, "sequence_parallel": True}, {"pp": 2}],
                         ids=["tp1", "tp2+sp", "pp2"])
def test_recomputation_gives_the_same_loss_and_grads(pool2, layout):
    for rank_result in pool2.run(_compare, layout):
        for name, (loss_err, grad_err, cross_keys) in rank_result.items():
            assert loss_err < 1e-6 and grad_err < 1e-5, (layout, name, loss_err, grad_err)
            assert cross_keys > 0, "the cross blocks' gradients must be compared"


def _train(argv):
    from megatron_jam.training.loop import main

    return [r["lm_loss"] for r in main(argv)]


def test_trainer_flags_recompute_with_the_same_curve(pool2):
    common = ["--train-iters", "3", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100"]
    ref = pool2.run(_train, common)[0]
    got = pool2.run(_train, common + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                      "--recompute-num-layers", "1"])[0]
    assert len(ref) == 3 and all(math.isfinite(x) for x in ref)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got)), (ref, got)
