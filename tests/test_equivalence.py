"""JAM-Cross at TP=2, PP=2 (1F1B and interleaved) and TP=2 with sequence parallelism equals TP=1/PP=1.

Loss and every parameter's gradient, after one step through Megatron-Core's
schedules with 4 micro-batches and `finalize_model_grads`, within 1e-5
relative, in fp32.
"""

import pytest

from megatron_jam.models.config import JamCrossConfig, ParentConfig
from megatron_jam.testing.equivalence import equivalence_body

TOL = 1e-5


def _check(result: dict, n_layouts: int) -> None:
    assert len(result["layouts"]) == n_layouts
    for name, r in result["layouts"].items():
        assert r["loss_rel_err"] <= TOL, (name, r)
        assert r["grad_worst_rel_err"] <= TOL, (name, r)
        assert r["weights_max_rel_err"] == 0.0, (name, r)
        assert r["zero_grad_keys"] == [], (name, r["zero_grad_keys"])
        # the layout really split the model: each rank holds fewer parameters than TP=1/PP=1
        assert r["local_numel"] < result["reference_local_numel"], (name, r)


MIXED = JamCrossConfig(
    llm=ParentConfig(family="llama", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     add_bias_linear=False, max_position_embeddings=64),
    img=ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=4,
                     max_position_embeddings=64),
    vocab_size=200, cross_every=2, cross_zero_init=False, seq_length=16)

CM3LEON = JamCrossConfig(
    llm=ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=4, add_bias_linear=False,
                     learnable_norm=False, max_position_embeddings=64),
    img=ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=4, add_bias_linear=False,
                     learnable_norm=False, max_position_embeddings=64),
    vocab_size=200, cross_every=1, cross_zero_init=False, seq_length=16)


@pytest.mark.parametrize("cfg", [MIXED, CM3LEON], ids=["llama+opt,k=2", "cm3leon-style,k=1"])
def test_tp_pp_sp_match_reference(pool2, cfg):
    layouts = [dict(tp=2), dict(pp=2), dict(tp=2, sequence_parallel=True)]
    results = pool2.run(equivalence_body, cfg.to_dict(), layouts)
    _check(results[0], 3)
    # every rank gathered the same losses and gradients
    for name, r in results[1]["layouts"].items():
        assert r["grad_worst_rel_err"] == results[0]["layouts"][name]["grad_worst_rel_err"]
        assert r["loss"] == results[0]["layouts"][name]["loss"]
    # all parameter families are present in the comparison (cross blocks, fusion, both streams)
    keys = results[0]["keys"]
    for prefix in ("llm.layers.", "img.layers.", "llm_cross.layers.", "img_cross.layers.", "fusion.weight",
                   "embedding.word_embeddings.weight"):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_interleaved_virtual_pipeline_matches_reference(pool2):
    layouts = [dict(pp=2, vpp=2)]
    results = pool2.run(equivalence_body, CM3LEON.to_dict(), layouts, num_microbatches=4)
    _check(results[0], 1)
