"""`--attention-backend`: PyTorch SDPA (the default of the local specs) computes Megatron's unfused attention.

Module level: the same queries, keys and values through `JamDotProductAttention` under `unfused` and `auto`
(SDPA) give the same outputs and input gradients in fp32, with grouped-query attention, the implicit causal
mask, and an explicit decoding mask that leaves one query with no visible key (finite in both, not compared:
a padding slot). Model level: a JAM-Cross model
(GQA Llama stream, OPT stream, causal cross blocks) gives the same loss and parameter gradients with both
backends at TP=1 and at TP=2 with sequence parallelism, from the same weights.
"""

import pytest
import torch
from megatron.core.transformer.enums import AttnBackend, AttnMaskType

from megatron_jam.models.config import JamCrossConfig, ParentConfig

CFG = JamCrossConfig(
    llm=ParentConfig(family="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     add_bias_linear=False, max_position_embeddings=64),
    img=ParentConfig(family="opt", num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=64),
    vocab_size=96, cross_every=1, seq_length=16, cross_zero_init=False)


def _attention(backend, heads=4, groups=2):
    from megatron_jam.models.attention import JamDotProductAttention
    from megatron_jam.models.builders import parent_transformer_config

    p = ParentConfig(family="llama", num_layers=1, hidden_size=8 * heads, num_attention_heads=heads,
                     num_query_groups=groups)
    config = parent_transformer_config(p, attention_backend=backend)
    return JamDotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                  attention_type="self")


def _run(module, q, k, v, mask):
    """Output and input gradients; queries that see no key (padding slots: their output is never read, and
    the two backends average different things there) are left out of both."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    seen = torch.ones(out.shape[:2]) if mask is None else (~mask[:, 0].all(-1)).T.float()  # [sq, b]
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape) * seen[..., None])
    assert torch.isfinite(out).all()
    return out.detach() * seen[..., None], [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("explicit_mask", [False, True])
def test_sdpa_equals_unfused_attention_with_gqa(single_rank, explicit_mask):
    g = torch.Generator().manual_seed(0)
    s, b = 7, 3
    q, k, v = torch.randn(s, b, 4, 8, generator=g), torch.randn(s, b, 2, 8, generator=g), torch.randn(s, b, 2, 8,
                                                                                                        generator=g)
    mask = None
    if explicit_mask:  # decoding-style: causal and some invalid key slots; row 2's first query sees nothing
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).expand(b, 1, s, s).clone()
        mask[1, :, :, 2] = True
        mask[2, :, 0, 0] = True
    ref_out, ref_grads = _run(_attention(AttnBackend.unfused), q, k, v, mask)
    out, grads = _run(_attention(AttnBackend.auto), q, k, v, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _forget_backend():
    """This test builds the model twice in one process, once per backend (Megatron-Core pins one)."""
    from megatron_jam.models.attention import forget_attention_backend

    forget_attention_backend()


def _both_backends(tp, sequence_parallel):
    from megatron_jam.testing.equivalence import make_batches, relative_errors, run_layout

    batches = make_batches(CFG.vocab_size, 2, 2, CFG.seq_length, seed=3)
    _forget_backend()
    ref_loss, w, ref_g, _ = run_layout(CFG, batches, tp=tp, sequence_parallel=sequence_parallel,
                                       attention_backend=AttnBackend.unfused)
    _forget_backend()
    loss, _, g, _ = run_layout(CFG, batches, tp=tp, sequence_parallel=sequence_parallel, weights=w,
                               attention_backend=AttnBackend.auto)
    _forget_backend()
    errs = relative_errors(ref_g, g)
    return abs(loss - ref_loss) / ref_loss, max(errs.values()), sorted(k for k in errs if "cross" in k)


@pytest.mark.parametrize("layout", [(1, False), (2, True)], ids=["tp1", "tp2+sp"])
def test_jam_cross_loss_and_grads_equal_with_sdpa(pool2, layout):
    for loss_err, grad_err, cross_keys in pool2.run(_both_backends, *layout):
        assert loss_err < 1e-6 and grad_err < 1e-4, (loss_err, grad_err)
        assert cross_keys, "the cross blocks' attention must be part of the comparison"


def _train(argv):
    from megatron_jam.training.loop import main

    _forget_backend()
    try:
        return [r["lm_loss"] for r in main(argv)]
    finally:
        _forget_backend()


def test_trainer_flag_gives_the_same_curve(pool2):
    """`--attention-backend unfused` vs the default (SDPA): the tiny default's training curve at DP=2."""
    common = ["--train-iters", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100"]
    sdpa = pool2.run(_train, common)[0]
    unfused = pool2.run(_train, common + ["--attention-backend", "unfused"])[0]
    assert len(sdpa) == 4 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(sdpa, unfused)), (sdpa, unfused)
